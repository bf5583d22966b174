//! A device over tokio on the sans-IO [`crate::client`]: handshake (with RETRY and
//! retransmission), requests with retries, pushes acknowledged as they arrive. Tests and the
//! load generator use it; it is also a worked example for firmware authors.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::client::{Accepted, ClientError, Connecting, Established, retry_cookie};
use crate::handshake::Hello;
use crate::wire::{Ext, Frame, Frames};

/// Why a device could not connect.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Socket trouble.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The protocol failed, or the gateway refused (`ClientError::Refused`).
    #[error("{0}")]
    Protocol(#[from] ClientError),
    /// No answer to the handshake.
    #[error("no answer from the gateway")]
    Timeout,
}

/// An answer from the gateway: a RESPONSE or a PUSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP-style status (200 for pushes).
    pub status: u16,
    /// Extension name (pushes and answers without id).
    pub ext: String,
    /// Resource path (pushes and answers without id).
    pub path: String,
    /// The payload, or an error's reason phrase.
    pub payload: Vec<u8>,
}

/// A connected device.
pub struct Device {
    socket: UdpSocket,
    gateway: SocketAddr,
    session: Established,
    accepted: Accepted,
    answers: HashMap<u32, Reply>,
    unsolicited: VecDeque<Reply>,
    pushes: VecDeque<Reply>,
    /// Push ids handled lately: a retransmitted push is acknowledged again, not handed on twice.
    seen_pushes: VecDeque<u64>,
    closed: Option<(u16, String)>,
    buf: Vec<u8>,
}

fn ext_name(aliases: &[String], ext: Ext<'_>) -> String {
    match ext {
        Ext::Alias(a) => aliases.get(usize::from(a)).cloned().unwrap_or_default(),
        Ext::Name(n) => n.to_owned(),
    }
}

impl Device {
    /// Handshakes with the gateway at `gateway` whose public key is `key`, from a fresh local
    /// port. INIT is retransmitted every second until `wait` has passed.
    pub async fn connect(
        gateway: SocketAddr,
        key: &[u8; 32],
        hello: &Hello<'_>,
        wait: Duration,
    ) -> Result<Self, DeviceError> {
        let local: SocketAddr = if gateway.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .map_err(|_| DeviceError::Timeout)?;
        let socket = UdpSocket::bind(local).await?;
        let sender = rand::random::<u32>().max(1);
        let mut connecting = Connecting::new(key, sender, hello, None)?;
        let mut cookie = None;
        let deadline = Instant::now() + wait;
        let mut buf = vec![0; 65_536];
        let mut init = connecting.init_packet(cookie.as_ref())?;
        socket.send_to(&init, gateway).await?;
        let mut resend = Instant::now() + Duration::from_secs(1);
        loop {
            let until = resend.min(deadline);
            match tokio::time::timeout_at(until, socket.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) => {
                    if let Some(c) = retry_cookie(&buf[..n], sender) {
                        cookie = Some(c);
                        init = connecting.init_packet(cookie.as_ref())?;
                        socket.send_to(&init, gateway).await?;
                        continue;
                    }
                    match connecting.finish(&buf[..n]) {
                        Ok((session, accepted)) => {
                            return Ok(Self {
                                socket,
                                gateway,
                                session,
                                accepted,
                                answers: HashMap::new(),
                                unsolicited: VecDeque::new(),
                                pushes: VecDeque::new(),
                                seen_pushes: VecDeque::new(),
                                closed: None,
                                buf,
                            });
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) if Instant::now() >= deadline => return Err(DeviceError::Timeout),
                Err(_) => {
                    socket.send_to(&init, gateway).await?;
                    resend = Instant::now() + Duration::from_secs(1);
                }
            }
        }
    }

    /// What the gateway's welcome said.
    pub fn accepted(&self) -> &Accepted {
        &self.accepted
    }

    /// The session's crypto state (tests seal their own packets with it).
    pub fn session(&mut self) -> &mut Established {
        &mut self.session
    }

    /// The gateway's address.
    pub fn gateway(&self) -> SocketAddr {
        self.gateway
    }

    /// Why the gateway closed the session, if it did.
    pub fn closed(&self) -> Option<&(u16, String)> {
        self.closed.as_ref()
    }

    /// Moves to a new local port (as after a NAT rebinding); the session stays.
    pub async fn rebind(&mut self) -> std::io::Result<()> {
        let local = SocketAddr::new(self.socket.local_addr()?.ip(), 0);
        self.socket = UdpSocket::bind(local).await?;
        Ok(())
    }

    /// The local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    fn ext<'a>(&self, name: &'a str) -> Ext<'a> {
        match self
            .accepted
            .aliases
            .iter()
            .position(|a| a == name)
            .and_then(|i| u8::try_from(i).ok())
        {
            Some(i) => Ext::Alias(i),
            None => Ext::Name(name),
        }
    }

    /// The frames of one request.
    pub fn request_frame(&self, ext: &str, path: &str, id: Option<u32>, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(payload.len() + 32);
        Frame::Request { ext: self.ext(ext), path, id, payload }.put(&mut f);
        f
    }

    /// Sends sealed `frames` in one datagram.
    pub async fn send_frames(&mut self, frames: &[u8]) -> std::io::Result<()> {
        let packet = self.session.seal(frames);
        self.socket.send_to(&packet, self.gateway).await.map(drop)
    }

    /// Sends raw bytes (tests: replays, forgeries).
    pub async fn send_raw(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.socket.send_to(bytes, self.gateway).await.map(drop)
    }

    /// Sends one request without waiting for anything.
    pub async fn send(
        &mut self,
        ext: &str,
        path: &str,
        id: Option<u32>,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let f = self.request_frame(ext, path, id, payload);
        self.send_frames(&f).await
    }

    /// Sends a request with id `id` and waits up to `wait` for its answer, retransmitting it
    /// after 2 s, then 4 s, ... (each retransmission a new packet number).
    pub async fn request(
        &mut self,
        ext: &str,
        path: &str,
        id: u32,
        payload: &[u8],
        wait: Duration,
    ) -> Option<Reply> {
        let deadline = Instant::now() + wait;
        let frames = self.request_frame(ext, path, Some(id), payload);
        let mut backoff = Duration::from_secs(2);
        loop {
            self.send_frames(&frames).await.ok()?;
            let until = (Instant::now() + backoff).min(deadline);
            while Instant::now() < until {
                if let Some(a) = self.answers.remove(&id) {
                    return Some(a);
                }
                self.receive_until(until).await;
            }
            if let Some(a) = self.answers.remove(&id) {
                return Some(a);
            }
            if Instant::now() >= deadline {
                return None;
            }
            backoff *= 2;
        }
    }

    /// The next answer without request id (an error for a request without id) within `wait`.
    pub async fn next_unsolicited(&mut self, wait: Duration) -> Option<Reply> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(r) = self.unsolicited.pop_front() {
                return Some(r);
            }
            if Instant::now() >= deadline || !self.receive_until(deadline).await {
                return self.unsolicited.pop_front();
            }
        }
    }

    /// The next push within `wait` (acknowledged already).
    pub async fn next_push(&mut self, wait: Duration) -> Option<Reply> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(r) = self.pushes.pop_front() {
                return Some(r);
            }
            if Instant::now() >= deadline || !self.receive_until(deadline).await {
                return self.pushes.pop_front();
            }
        }
    }

    /// Sends a PING and waits for any datagram (true when one authentic packet came).
    pub async fn ping(&mut self, wait: Duration) -> bool {
        let mut f = Vec::new();
        Frame::Ping(*b"fgu-ping").put(&mut f);
        if self.send_frames(&f).await.is_err() {
            return false;
        }
        self.receive_until(Instant::now() + wait).await
    }

    /// Reads one datagram (or none by `until`) and files what it holds. True when an
    /// authentic packet arrived.
    pub async fn receive_until(&mut self, until: Instant) -> bool {
        let Ok(Ok((n, _))) =
            tokio::time::timeout_at(until, self.socket.recv_from(&mut self.buf)).await
        else {
            return false;
        };
        let Ok(plain) = self.session.open(&self.buf[..n]) else { return false };
        let mut acks = Vec::new();
        for frame in Frames::new(&plain) {
            let Ok(frame) = frame else { break };
            match frame {
                Frame::Response { id, target, status, payload } => {
                    let (ext, path) = target.map_or((String::new(), String::new()), |(e, p)| {
                        (ext_name(&self.accepted.aliases, e), p.to_owned())
                    });
                    let reply = Reply { status, ext, path, payload: payload.to_vec() };
                    match id {
                        Some(id) => {
                            self.answers.insert(id, reply);
                        }
                        None => self.unsolicited.push_back(reply),
                    }
                }
                Frame::Push { id, ext, path, payload } => {
                    Frame::Ack(id).put(&mut acks);
                    if self.seen_pushes.contains(&id) {
                        continue;
                    }
                    if self.seen_pushes.len() >= 64 {
                        self.seen_pushes.pop_front();
                    }
                    self.seen_pushes.push_back(id);
                    self.pushes.push_back(Reply {
                        status: 200,
                        ext: ext_name(&self.accepted.aliases, ext),
                        path: path.to_owned(),
                        payload: payload.to_vec(),
                    });
                }
                Frame::Close { code, reason } => self.closed = Some((code, reason.to_owned())),
                // The gateway checks a new address with a PING (SPEC §6): answer from it.
                Frame::Ping(data) => Frame::Pong(data).put(&mut acks),
                _ => {}
            }
        }
        if !acks.is_empty() {
            let _ = self.send_frames(&acks).await;
        }
        true
    }
}
