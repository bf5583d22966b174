//! One simulated FGU/1 device (fleetgate's custom UDP protocol): its own UDP socket, bound to
//! a chosen source address and `connect()`ed to the gateway, a Noise NK handshake with the
//! pinned gateway key (the sans-IO client of `fleetgate-transport-udp`), then each data sample
//! as one REQUEST frame to `dcx` `/json` in one DATA datagram.
//!
//! Sending never waits: [`UdpDevice::publish`] seals and hands the datagram to the socket with
//! `try_send`; a full socket buffer is backpressure. QoS 1 sends requests with a request id
//! (answered by a RESPONSE; at most `window` outstanding per device), QoS 0 without (1/KP:
//! only errors are answered). The reader task counts each RESPONSE to an outstanding id as
//! acknowledged (an error when its status is 4xx or 5xx) and acknowledges pushes.
//!
//! What it does not do: retransmit requests (a loss shows as a missing delivery), or run a new
//! handshake when the session ends.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetgate_transport_mqtt::codec::QoS;
use fleetgate_transport_udp::client::{Connecting, Established, retry_cookie};
use fleetgate_transport_udp::handshake::Hello;
use fleetgate_transport_udp::wire::{Ext, Frame, Frames};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::device::{ConnectError, Liveness, SendOutcome};
use crate::stats::{Failure, RunCounters, mono_nanos};

/// How every FGU/1 device of a run reaches the gateway.
#[derive(Debug, Clone)]
pub struct UdpOptions {
    /// The gateway's FGU/1 address.
    pub target: SocketAddr,
    /// The gateway's public key, which the devices pin.
    pub gateway_key: [u8; 32],
    /// The 1/KP application version of the hello.
    pub app_version: String,
    /// Requests with an id a device may have outstanding.
    pub window: u32,
    /// The handshake must be answered within this.
    pub connect_timeout: Duration,
}

struct State {
    session: Established,
    /// The alias of `dcx` from the welcome, if any.
    dcx: Option<u8>,
    next_id: u32,
    /// Request id → when it was sent ([`mono_nanos`]), for the round trip.
    outstanding: HashMap<u32, u64>,
    scratch: Vec<u8>,
}

/// An FGU/1 device with its session open.
pub struct UdpDevice {
    socket: UdpSocket,
    state: Mutex<State>,
    inflight: AtomicU32,
    window: u32,
    live: Liveness,
}

impl std::fmt::Debug for UdpDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpDevice").field("open", &self.live.is_open()).finish_non_exhaustive()
    }
}

/// Opens the device's socket from `source` to `opts.target` and runs the handshake with
/// `token` (INIT retransmitted every second, a RETRY's cookie echoed).
pub async fn connect(
    opts: &UdpOptions,
    source: Option<IpAddr>,
    token: &str,
    counters: Arc<RunCounters>,
) -> Result<Arc<UdpDevice>, ConnectError> {
    let unspecified =
        if opts.target.is_ipv4() { IpAddr::from([0, 0, 0, 0]) } else { IpAddr::from([0u16; 8]) };
    let bind = SocketAddr::new(source.unwrap_or(unspecified), 0);
    let socket = UdpSocket::bind(bind).await.map_err(|e| ConnectError::Bind(bind, e))?;
    socket.connect(opts.target).await.map_err(ConnectError::Socket)?;
    let sender = rand_id(token);
    let hello = Hello {
        app_version: &opts.app_version,
        token: Some(token),
        username: None,
        password: None,
    };
    let refused = |_| ConnectError::Unanswered("a valid FGU/1 handshake");
    let mut connecting =
        Connecting::new(&opts.gateway_key, sender, &hello, None).map_err(refused)?;
    let handshake = async {
        let mut init = connecting.init_packet(None).map_err(refused)?;
        let mut buf = vec![0u8; 2048];
        loop {
            socket.send(&init).await.map_err(ConnectError::Socket)?;
            let n = match tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buf)).await
            {
                Ok(r) => r.map_err(ConnectError::Socket)?,
                Err(_) => continue,
            };
            if let Some(cookie) = retry_cookie(&buf[..n], sender) {
                init = connecting.init_packet(Some(&cookie)).map_err(refused)?;
                continue;
            }
            return Ok::<_, ConnectError>(buf[..n].to_vec());
        }
    };
    let resp = tokio::time::timeout(opts.connect_timeout, handshake)
        .await
        .map_err(|_| ConnectError::Unanswered("answer to the FGU/1 handshake"))??;
    let (session, accepted) = connecting
        .finish(&resp)
        .map_err(|_| ConnectError::Unanswered("an accepted FGU/1 handshake"))?;
    let dcx = accepted.aliases.iter().position(|a| a == "dcx").and_then(|i| u8::try_from(i).ok());
    Ok(Arc::new(UdpDevice {
        socket,
        state: Mutex::new(State {
            session,
            dcx,
            next_id: 1,
            outstanding: HashMap::new(),
            scratch: Vec::with_capacity(256),
        }),
        inflight: AtomicU32::new(0),
        window: opts.window.max(1),
        live: Liveness::opened(counters),
    }))
}

/// A non-zero session id that differs per device and per run.
fn rand_id(token: &str) -> u32 {
    let now = crate::stats::unix_nanos();
    let mut h = now as u32 ^ (now >> 32) as u32;
    for b in token.bytes() {
        h = h.rotate_left(5) ^ u32::from(b);
        h = h.wrapping_mul(0x9E37_79B1);
    }
    h.max(1)
}

impl UdpDevice {
    /// Whether the device still sends.
    pub fn is_open(&self) -> bool {
        self.live.is_open()
    }

    /// Sends one data sample now, without waiting: with a request id for QoS 1, without for
    /// QoS 0.
    pub fn publish(&self, qos: QoS, payload: &[u8]) -> SendOutcome {
        if !self.is_open() {
            return SendOutcome::Closed;
        }
        let with_id = qos != QoS::AtMostOnce;
        if with_id && self.inflight.load(Ordering::Relaxed) >= self.window {
            return SendOutcome::WindowFull;
        }
        let Ok(mut guard) = self.state.lock() else { return SendOutcome::Closed };
        let st = &mut *guard;
        let id = with_id.then(|| {
            let id = st.next_id;
            st.next_id = if id >= 0x7fff_ffff { 1 } else { id + 1 };
            id
        });
        let ext = st.dcx.map_or(Ext::Name("dcx"), Ext::Alias);
        st.scratch.clear();
        Frame::Request { ext, path: "/json", id, payload }.put(&mut st.scratch);
        let packet = st.session.seal(&st.scratch);
        match self.socket.try_send(&packet) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return SendOutcome::BufferFull,
            Err(_) => {
                drop(guard);
                self.live.mark_closed();
                return SendOutcome::Closed;
            }
        }
        if let Some(id) = id {
            st.outstanding.insert(id, mono_nanos());
            self.inflight.fetch_add(1, Ordering::Relaxed);
        }
        SendOutcome::Sent { pending: false }
    }

    /// Nothing is ever left to write: datagrams go out whole or not at all.
    pub fn flush(&self) -> bool {
        false
    }

    fn handle(&self, datagram: &[u8]) {
        let Ok(mut st) = self.state.lock() else { return };
        let Ok(plain) = st.session.open(datagram) else { return };
        let step = self.live.counters().current();
        let mut acks = Vec::new();
        for frame in Frames::new(&plain) {
            let Ok(frame) = frame else { break };
            match frame {
                Frame::Response { id: Some(id), status, payload, .. }
                    if let Some(sent) = st.outstanding.remove(&id) =>
                {
                    let _ = self.inflight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(1))
                    });
                    step.acked.fetch_add(1, Ordering::Relaxed);
                    let counters = self.live.counters();
                    counters.round_trip(sent);
                    if status >= 400 {
                        step.ack_errors.fetch_add(1, Ordering::Relaxed);
                        counters.fail(Failure::Udp(status), || {
                            Some(String::from_utf8_lossy(payload).into_owned())
                        });
                    }
                }
                Frame::Push { id, .. } => Frame::Ack(id).put(&mut acks),
                Frame::Close { .. } => self.live.mark_closed(),
                _ => {}
            }
        }
        if !acks.is_empty() {
            let packet = st.session.seal(&acks);
            let _ = self.socket.try_send(&packet);
        }
    }

    /// The reader: runs until `stop` turns true or the socket fails.
    pub async fn read_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut buf = vec![0u8; 2048];
        while self.is_open() && !*stop.borrow() {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                r = self.socket.readable() => {
                    if r.is_err() {
                        self.live.mark_closed();
                        return;
                    }
                    loop {
                        match self.socket.try_recv(&mut buf) {
                            Ok(n) => self.handle(&buf[..n]),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => {
                                self.live.mark_closed();
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
        self.live.mark_closed();
    }
}
