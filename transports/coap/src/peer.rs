//! The tokio task of one peer address: the glue between a [`PeerSession`] and the world.
//!
//! It feeds the session the datagrams its reader queues for it and the answers and pushes of
//! its 1/KP session's outbox, sends the session's transmits on the socket, calls the gateway
//! ([`KpHandler`]) for the session's events and hands back the results, sleeps until the
//! session's next deadline, adds the session's counts to the transport's metrics and logs what
//! the session reports. All CoAP logic is in the session; nothing here decides what a device
//! sees, only when.
//!
//! The gateway is awaited one call at a time, as it always was: a slow backend slows the peers
//! that use it, not the socket (the reader drops datagrams on a full peer queue).

use fleetgate_transport_core::stopped;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use fleetgate_transport_core::{
    ClientCredentials, KpHandler, OutboxReceiver, outbox as new_outbox,
};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::server::Shared;
use crate::session::{Diagnostic, Event, PeerSession, Stats};

/// Queued datagrams and answers a peer handles in a row before it looks at its timers again.
const READY_BUDGET: usize = 32;

/// One received datagram and when it arrived.
pub(crate) struct Datagram {
    pub bytes: Bytes,
    pub at: Instant,
}

/// Decrements the transport's peer count when a peer task ends, however it ends.
struct PeerSlot(Arc<Shared>);

impl Drop for PeerSlot {
    fn drop(&mut self) {
        self.0.peers.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.sessions_open.dec();
    }
}

pub(crate) struct Peer {
    handler: Arc<dyn KpHandler>,
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    addr: SocketAddr,
    session: PeerSession,
    /// The 1/KP session's answers and pushes, once the gateway opened it.
    outbox: Option<OutboxReceiver>,
    /// When the last datagram handed to the session was read: a request's latency counts from
    /// the read that brought it.
    last_read: Instant,
    /// Set once the gateway accepts one of the peer's requests: the reader then no longer
    /// counts the peer in its pool of unproven ones.
    proven: Arc<AtomicBool>,
    _slot: PeerSlot,
}

impl Peer {
    pub(crate) fn new(
        handler: Arc<dyn KpHandler>,
        shared: Arc<Shared>,
        socket: Arc<UdpSocket>,
        addr: SocketAddr,
        proven: Arc<AtomicBool>,
    ) -> Self {
        shared.metrics.sessions_open.inc();
        let now = Instant::now();
        let mut session = PeerSession::new(shared.session_settings(), seed(addr), now);
        session.set_block1_budget(shared.block1_budget.clone());
        Self {
            handler,
            socket,
            addr,
            session,
            outbox: None,
            last_read: now,
            proven,
            _slot: PeerSlot(shared.clone()),
            shared,
        }
    }

    pub(crate) async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Datagram>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let first = self.session.poll_timeout().unwrap_or_else(Instant::now);
        let sleep = tokio::time::sleep_until(first.into());
        tokio::pin!(sleep);
        // Registered with the shutdown signal once for the task's life, not once per event.
        let stop = stopped(&mut shutdown);
        tokio::pin!(stop);
        loop {
            let now = Instant::now();
            let mut next = self.session.poll_timeout();
            if next.is_some_and(|due| due <= now) {
                self.session.handle_timeout(now);
                self.drive().await;
                next = self.session.poll_timeout();
            }
            let Some(next) = next else {
                // Closed: idle for too long.
                tracing::debug!("idle: closing");
                break;
            };
            // The timer is only moved earlier (or re-armed once it fired): most events push
            // the next deadline later (the idle timeout), and a timer that fires early merely
            // wakes the task once to re-arm it, which is cheaper than updating the timer wheel
            // on every datagram.
            let next = tokio::time::Instant::from_std(next);
            if next < sleep.deadline() || sleep.is_elapsed() {
                sleep.as_mut().reset(next);
            }
            let outbox = async {
                match self.outbox.as_mut() {
                    Some(outbox) => outbox.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = &mut stop => {
                    self.drain_outbox().await;
                    break;
                }
                () = &mut sleep => {}
                // Answers before new requests: they free state, and a session whose outbox
                // fills is closed by the gateway.
                response = outbox => match response {
                    Some(response) => {
                        self.session.on_response(response, Instant::now());
                        self.drive().await;
                        self.take_ready(&mut inbound).await;
                    }
                    None => {
                        tracing::debug!("session closed by the gateway");
                        self.outbox = None;
                        self.session.session_lost();
                        self.drive().await;
                    }
                },
                datagram = inbound.recv() => match datagram {
                    Some(datagram) => {
                        self.last_read = datagram.at;
                        self.session.handle_datagram(datagram.bytes, datagram.at);
                        self.drive().await;
                        self.take_ready(&mut inbound).await;
                    }
                    None => break,
                },
            }
        }
        inbound.close();
        self.session.close();
        self.drive().await;
    }

    /// Handles what is already queued (answers first), up to a budget, without going through
    /// the `select!` for each: a woken peer usually finds several. Stops as soon as a timer is
    /// due, so that, e.g., an answer that comes after `ack_timeout_ms` still goes out as a
    /// separate response after an empty ACK.
    async fn take_ready(&mut self, inbound: &mut mpsc::Receiver<Datagram>) {
        for _ in 0..READY_BUDGET {
            let now = Instant::now();
            if self.session.poll_timeout().is_none_or(|due| due <= now) {
                return;
            }
            if let Some(response) = self.outbox.as_mut().and_then(|o| o.try_recv().ok()) {
                self.session.on_response(response, now);
            } else if let Ok(datagram) = inbound.try_recv() {
                self.last_read = datagram.at;
                self.session.handle_datagram(datagram.bytes, datagram.at);
            } else {
                return;
            }
            self.drive().await;
        }
    }

    async fn drain_outbox(&mut self) {
        while let Some(response) = self.outbox.as_mut().and_then(|o| o.try_recv().ok()) {
            self.session.on_response(response, Instant::now());
        }
        self.drive().await;
    }

    /// Sends what the session has to send and handles its events until it has neither. A
    /// gateway call is awaited and its result handed back, which may queue more of both. The
    /// session's counts go to the metrics before what they count goes out.
    async fn drive(&mut self) {
        loop {
            self.report();
            while let Some(datagram) = self.session.poll_transmit() {
                if let Err(e) = self.socket.send_to(&datagram, self.addr).await {
                    tracing::debug!(error = %e, "send failed");
                }
            }
            let Some(event) = self.session.poll_event() else { return };
            match event {
                Event::Request { session, request } => {
                    let tag = request.tag;
                    let result = self.handler.handle(session, request).await;
                    self.shared.metrics.request_accept.observe(self.last_read.elapsed());
                    if let Err(e) = &result {
                        tracing::debug!(status = e.status, reason = %e.reason, "request refused by the gateway");
                    }
                    self.session.request_done(tag, result, Instant::now());
                }
                Event::OpenSession { username, password } => {
                    let (outbox, responses) =
                        // Room for the pushes, and for the answer to every exchange in flight.
                        new_outbox(
                            self.shared.config.read().response_queue_capacity
                                + self.session.settings().max_exchanges,
                        );
                    let credentials = ClientCredentials {
                        transport: "coap",
                        client_id: "",
                        username: username.as_deref(),
                        password: password.as_deref(),
                        peer: self.addr,
                        certificate: None,
                    };
                    let result = self.handler.open_session(credentials, outbox).await;
                    let opened = match &result {
                        Ok(identity) => {
                            tracing::debug!(session = identity.session.0, "session opened");
                            Some(identity.session)
                        }
                        Err(e) => {
                            tracing::debug!(status = e.status, reason = %e.reason, "session refused");
                            None
                        }
                    };
                    self.session.session_opened(result, Instant::now());
                    // The outbox belongs to the session only if the session took it (it hands
                    // back a session it no longer wants as `CloseSession`).
                    if opened.is_some() && self.session.session() == opened {
                        self.outbox = Some(responses);
                    }
                }
                Event::CloseSession(id) => self.handler.close_session(id),
                Event::Diagnostic(diagnostic) => log(&diagnostic),
            }
        }
    }

    /// Adds the session's counts since the last report to the transport's metrics.
    fn report(&mut self) {
        let stats = self.session.take_stats();
        if stats == Stats::default() {
            return;
        }
        let m = &self.shared.metrics;
        let counters = [
            (&m.messages_received, stats.messages_received),
            (&m.messages_sent, stats.messages_sent),
            (&m.protocol_errors, stats.protocol_errors),
            (&m.duplicates, stats.duplicates),
            (&m.separate_responses, stats.separate_responses),
            (&m.retransmissions, stats.retransmissions),
            (&m.retransmit_timeouts, stats.retransmit_timeouts),
            (&m.resets_received, stats.resets_received),
            (&m.notifications, stats.notifications),
            (&m.pushes_unobserved, stats.pushes_unobserved),
            (&m.block_transfers, stats.block_transfers),
            (&m.sessions_opened, stats.sessions_opened),
            (&m.sessions_refused, stats.sessions_refused),
            (&m.sessions_expired, stats.sessions_expired),
            (&m.replies_trimmed, stats.replies_trimmed),
            (&m.block1_budget_refusals, stats.block1_budget_refusals),
            (&m.peers_proven, stats.proven),
        ];
        if stats.proven > 0 {
            self.proven.store(true, Ordering::Relaxed);
        }
        for (counter, n) in counters {
            if n > 0 {
                counter.inc_by(n);
            }
        }
        let observations = i64::try_from(stats.observations_registered)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(stats.observations_ended).unwrap_or(i64::MAX));
        if observations != 0 {
            m.observations_open.inc_by(observations);
        }
    }
}

impl Drop for Peer {
    /// A task aborted (an unproven peer evicted) still ends its gateway session.
    fn drop(&mut self) {
        if let Some(id) = self.session.session() {
            self.handler.close_session(id);
        }
    }
}

fn log(diagnostic: &Diagnostic) {
    match diagnostic {
        Diagnostic::Undecodable(e) => tracing::debug!(error = %e, "undecodable datagram"),
        Diagnostic::Refused { code, reason } => {
            tracing::debug!(code = %code, reason = %reason, "request refused");
        }
        Diagnostic::GaveUp { message_id } => {
            tracing::debug!(mid = message_id, "confirmable message never acknowledged");
        }
        Diagnostic::PushUnobserved { base } => {
            tracing::debug!(base = %String::from_utf8_lossy(base), "push for a path nobody observes dropped");
        }
        Diagnostic::EncodeFailed(e) => tracing::error!(error = %e, "bug: cannot encode a response"),
    }
}

/// The session's seed: the peer's address and the time, through a randomly keyed hash, so
/// that message ids and hash keys differ between peers and runs.
fn seed(addr: SocketAddr) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    addr.hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    h.finish()
}
