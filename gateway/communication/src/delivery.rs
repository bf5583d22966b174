//! Store and forward: what happens to a request the bus cannot deliver in time.
//!
//! Normally a request goes straight to the bus and its acknowledgement waits for the
//! extension's answer. When no answer comes within `gateway.spool.delivery_timeout_ms`, or the
//! bus refuses the message because it is down, the request is written to the [`Spool`] and the
//! device hears that it is stored ([`KpOutcome::Stored`]); from then on new requests go to the
//! spool first, so that they stay behind the older ones, until the spool is empty again. The
//! forwarder replays the spool in order, a window at a time, while the bus takes messages, and
//! removes each record once its extension answered it with a success or a 4xx; a 5xx answer
//! (the extension or a reliable receiver behind it failed) keeps the record for a later replay,
//! after a back-off. The answer to a spooled request still reaches the device that sent it, if
//! it is connected here.
//!
//! Without a spool (`gateway.spool.enabled: false`) a request that is not answered in time is
//! answered 504, and a bus that refuses it gives 503: never an acknowledgement.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use fleetgate_bus::{Bus, Subject, now_ms};
use fleetgate_messages::{ClientData, Record as _, encode_pooled};
use fleetgate_transport_core::{KpError, KpOutcome, KpResponse};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::Gateway;
use crate::correlation::CorrelationId;
use crate::pending::{Pending, Route, State};
use crate::spool::{Record, Spool, SpoolError};

/// When requests go through the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpoolMode {
    /// Only what the bus cannot deliver in time (and what comes after it, until the spool is
    /// empty): the acknowledgement waits for the extension's answer otherwise.
    Fallback,
    /// Every request: acknowledged once it is on disk, forwarded from there. For sites that
    /// want the shortest acknowledgement whatever the backend does.
    Always,
}

/// `gateway.spool.*`: the store-and-forward spool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Whether requests the bus cannot deliver in time are spooled (and acknowledged) rather
    /// than refused.
    pub enabled: bool,
    /// `fallback` (the default) or `always`.
    pub mode: SpoolMode,
    /// The spool's directory; one gateway process at a time may use it.
    pub path: PathBuf,
    /// The most the spool holds on disk; when it is full, devices are not acknowledged and
    /// their reading is slowed, and the gateway is not ready.
    pub max_bytes: u64,
    /// How long a request waits for its extension's answer before it is spooled.
    pub delivery_timeout_ms: u64,
    /// Spooled requests replayed at once, waiting for their answers.
    pub forward_window: usize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: SpoolMode::Fallback,
            path: PathBuf::from("fleetgate-data/spool"),
            max_bytes: 1024 * 1024 * 1024,
            delivery_timeout_ms: 2_000,
            forward_window: 1024,
        }
    }
}

/// The state of store and forward, part of the gateway.
pub(crate) struct Delivery {
    pub(crate) spool: Option<Arc<Spool>>,
    /// Requests go to the spool first (it holds records, or the bus refused a message).
    spooling: AtomicBool,
    /// Every request goes to the spool ([`SpoolMode::Always`]).
    always: bool,
    /// Who waits for the late answer of a spooled request, by record.
    routes: Mutex<HashMap<u64, Route>>,
    /// Records replayed (or spooled while their original is on the bus) and not yet answered.
    replaying: Mutex<HashSet<u64>>,
    /// The oldest record whose replay was not answered in time since the forwarder last
    /// looked (`u64::MAX`: none): its cursor goes back there.
    rewind: AtomicU64,
    /// 5xx answers to replays since the last success: the forwarder waits longer before each
    /// new attempt (100 ms doubling to 5 s), so a failing extension is not flooded.
    refusals: AtomicU32,
    in_flight: AtomicUsize,
    /// Requests on their way into the spool (not durable yet).
    appending: AtomicUsize,
    /// Wakes the forwarder: a record was spooled, or a replay ended.
    wake: Notify,
    /// Wakes appenders waiting for room in a full spool.
    room: Notify,
    pub(crate) delivery_timeout: Duration,
    window: usize,
}

impl Delivery {
    /// Opens the spool when enabled (a start-up error names `gateway.spool.path`).
    pub(crate) fn open(config: &SpoolConfig) -> Result<Self, SpoolError> {
        let spool = match config.enabled {
            true => Some(Spool::open(&config.path, config.max_bytes)?),
            false => None,
        };
        let spooling = spool.as_ref().is_some_and(|s| !s.is_empty());
        if spooling {
            tracing::info!(
                records = spool.as_ref().map_or(0, |s| s.len()),
                "the spool holds requests from before: forwarding them first"
            );
        }
        Ok(Self {
            spool,
            spooling: AtomicBool::new(spooling),
            always: config.mode == SpoolMode::Always,
            routes: Mutex::default(),
            replaying: Mutex::default(),
            rewind: AtomicU64::new(u64::MAX),
            refusals: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            appending: AtomicUsize::new(0),
            wake: Notify::new(),
            room: Notify::new(),
            delivery_timeout: Duration::from_millis(config.delivery_timeout_ms.max(1)),
            window: config.forward_window.max(1),
        })
    }

    /// Requests on their way into the spool.
    pub(crate) fn appending(&self) -> usize {
        self.appending.load(Ordering::Relaxed)
    }

    /// Wakes the forwarder for a new record if it has nothing in flight; otherwise the answers
    /// to what it replayed wake it (a wake-up per record would make it read the spool per
    /// record).
    fn wake_idle_forwarder(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            self.wake.notify_one();
        }
    }

    /// Whether new requests go to the spool first.
    pub(crate) fn spooling(&self) -> bool {
        self.spool.is_some() && (self.always || self.spooling.load(Ordering::Relaxed))
    }

    fn routes(&self) -> MutexGuard<'_, HashMap<u64, Route>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn replaying(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.replaying.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why the gateway is not ready, as far as the spool is concerned.
    pub(crate) fn readiness(&self) -> Result<(), String> {
        match &self.spool {
            Some(spool) if spool.is_full(1) => {
                Err(format!("the spool is full ({} records, {} bytes)", spool.len(), spool.bytes()))
            }
            _ => Ok(()),
        }
    }
}

impl<B: Bus> Gateway<B> {
    /// Writes a request to the spool, waiting (up to the request timeout) for room while the
    /// spool is full, and tells the device it is stored. Refused with 503 when the spool has no
    /// room in time or cannot write.
    pub(crate) async fn spool_request(
        &self,
        route: Option<Route>,
        subject: &Subject,
        client_data: Bytes,
    ) -> Result<(), KpError> {
        let Some(spool) = &self.delivery.spool else {
            return Err(KpError::unavailable("the bus is unavailable"));
        };
        self.delivery.spooling.store(true, Ordering::Relaxed);
        let _appending = Appending::new(&self.delivery.appending);
        let record = Record { spooled_ms: now_ms(), subject: subject.to_string(), client_data };
        let deadline = Instant::now() + Duration::from_millis(self.config.request_timeout_ms);
        // Registered before the record can be replayed, so that its answer finds its device.
        let register = |seq: u64, written: bool| match (&route, written) {
            (Some(route), true) => {
                self.delivery.routes().insert(seq, route.clone());
            }
            (Some(_), false) => {
                self.delivery.routes().remove(&seq);
            }
            (None, _) => {}
        };
        loop {
            let room = self.delivery.room.notified();
            match spool.append(&record, register).await {
                Ok(_) => break,
                Err(SpoolError::Full { .. }) => {
                    self.metrics.spool_full.inc();
                    // Slowed, never acknowledged and dropped: the device waits for room.
                    if tokio::time::timeout_at(deadline, room).await.is_err() {
                        return Err(KpError::unavailable(
                            "the bus is unavailable and the spool is full",
                        ));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot spool a request");
                    return Err(KpError::unavailable(
                        "the bus is unavailable and the spool failed",
                    ));
                }
            }
        }
        self.metrics.spooled.inc();
        self.delivery.wake_idle_forwarder();
        if let Some(route) = route {
            self.deliver_answer(route.session, stored(&route));
        }
        Ok(())
    }

    /// A direct request got no answer in time: spooled, so that its device hears it is
    /// stored. The original is still on the bus and stands for the record's first replay:
    /// replaying it at once would send the extension a second copy of a request it is
    /// probably still working through (under load: twice the work, more timeouts). Like a
    /// replay, it has the request timeout to be answered; its answer settles the record.
    pub(crate) async fn spool_late(&self, n: u64, pending: Pending) {
        let Pending { route, sent, latency, state } = pending;
        let State::Direct { subject, client_data } = state else { return };
        let Some(spool) = &self.delivery.spool else { return };
        self.delivery.spooling.store(true, Ordering::Relaxed);
        let _appending = Appending::new(&self.delivery.appending);
        let record = Record { spooled_ms: now_ms(), subject: subject.to_string(), client_data };
        // Done before the record can be replayed (and before the original's answer can miss
        // it): its answer finds its device, and the forwarder skips it while the original is
        // in flight.
        let register = |seq: u64, written: bool| {
            if written {
                if let Some(route) = &route {
                    self.delivery.routes().insert(seq, route.clone());
                }
                self.delivery.replaying().insert(seq);
                self.delivery.in_flight.fetch_add(1, Ordering::Relaxed);
                let original = Pending {
                    route: None,
                    sent,
                    latency: latency.clone(),
                    state: State::Replay { seq },
                };
                self.pending.insert(n, original, sent + self.request_timeout());
            } else {
                self.delivery.routes().remove(&seq);
                if self.delivery.replaying().remove(&seq) {
                    self.delivery.in_flight.fetch_sub(1, Ordering::Relaxed);
                }
                self.pending.take(n);
            }
        };
        match spool.append(&record, register).await {
            Ok(_) => {
                self.metrics.spooled.inc();
                if let Some(route) = &route {
                    self.deliver_answer(route.session, stored(route));
                }
            }
            Err(e) => {
                // Not durable, not acknowledged: the device hears the timeout.
                tracing::warn!(error = %e, "cannot spool a request that timed out");
                if let Some(route) = route {
                    let reason = format!("the extension did not answer and the spool refused: {e}");
                    self.deliver_answer(route.session, error(&route, KpError::timeout(reason)));
                }
            }
        }
    }

    /// The extension answered spool record `seq` (a replay, or the original): the record is
    /// forgotten and the answer goes to the device that sent it, if it is here. A 5xx answer
    /// (the extension, or a reliable receiver behind it, failed or timed out) does not settle
    /// it: the device was told its request is stored, so the record stays and is replayed
    /// after a back-off. A 4xx answer settles it: the request itself is wrong, and sending it
    /// again would not change that.
    pub(crate) fn settle_record(&self, seq: u64, outcome: KpOutcome) {
        let Some(spool) = &self.delivery.spool else { return };
        if let KpOutcome::Error(e) = &outcome
            && e.status >= 500
        {
            tracing::debug!(seq, status = e.status, reason = %e.reason, "a spooled request was refused; it stays in the spool");
            self.metrics.spool_replay_refusals.inc();
            self.delivery.refusals.fetch_add(1, Ordering::Relaxed);
            if self.delivery.replaying().remove(&seq) {
                self.delivery.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            self.delivery.rewind.fetch_min(seq, Ordering::Relaxed);
            self.delivery.wake.notify_one();
            return;
        }
        self.delivery.refusals.store(0, Ordering::Relaxed);
        if let Err(e) = spool.remove(seq) {
            tracing::warn!(error = %e, seq, "cannot remove a delivered record from the spool");
        }
        self.delivery.room.notify_waiters();
        if self.delivery.replaying().remove(&seq) {
            let before = self.delivery.in_flight.fetch_sub(1, Ordering::Relaxed);
            // The forwarder refills once half the window is free.
            if before == self.delivery.window / 2 + 1 || before == 1 {
                self.delivery.wake.notify_one();
            }
        }
        self.metrics.spool_forwarded.inc();
        if let Some(route) = self.delivery.routes().remove(&seq) {
            // A late answer: its slot went to the `Stored` answer, so it queues like a push.
            let response = KpResponse {
                base: route.base,
                request_id: route.request_id,
                tag: route.tag,
                outcome,
            };
            self.deliver_late(route.session, response);
        }
    }

    /// A replay of record `seq` (or its original) was not answered in time: the forwarder goes
    /// back to it.
    pub(crate) fn replay_failed(&self, seq: u64) {
        if self.delivery.replaying().remove(&seq) {
            self.delivery.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        self.delivery.rewind.fetch_min(seq, Ordering::Relaxed);
        self.metrics.spool_replay_timeouts.inc();
        self.delivery.wake.notify_one();
    }

    /// Replays up to a window of spooled records after `after`, in order; returns the last
    /// one sent, or `None` when the bus refused (the caller backs off).
    async fn replay_batch(&self, spool: &Spool, after: Option<u64>) -> Result<Option<u64>, ()> {
        let room =
            self.delivery.window.saturating_sub(self.delivery.in_flight.load(Ordering::Relaxed));
        // Refilled in halves, not one record per answer: a read of the spool per record would
        // cost more than the replay itself.
        if room < self.delivery.window.div_ceil(2) {
            return Ok(after);
        }
        let records = match spool.read_after(after, room) {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the spool");
                return Err(());
            }
        };
        let mut last = after;
        for (seq, record) in records {
            last = Some(seq);
            if !self.delivery.replaying().insert(seq) {
                continue;
            }
            let Some((n, payload)) = self.reencode(&record.client_data) else {
                // Not a ClientData this gateway can read: dropped, loudly.
                tracing::error!(seq, "unreadable request in the spool dropped");
                self.delivery.replaying().remove(&seq);
                let _ = spool.remove(seq);
                continue;
            };
            self.delivery.in_flight.fetch_add(1, Ordering::Relaxed);
            let pending = Pending {
                route: None,
                sent: Instant::now(),
                latency: fleetgate_transport_core::metrics::Latency::default(),
                state: State::Replay { seq },
            };
            // No device waits for a replay: it has as long as any request to be answered
            // (after the delivery timeout a slow extension would get a copy of each).
            self.pending.insert(n, pending, Instant::now() + self.request_timeout());
            let subject = Subject::from(record.subject);
            let sent = self.bus.publish(subject, Some(self.reply_subject.clone()), payload).await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, "the bus refused a replay");
                if self.pending.take(n).is_some() {
                    self.replay_failed(seq);
                }
                return Err(());
            }
        }
        Ok(last)
    }

    /// How long an extension has to answer a request (`gateway.request_timeout_ms`).
    fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    /// The spooled `ClientData` with a correlation id of this replica's (a record may come
    /// from an earlier process) and a fresh timestamp.
    fn reencode(&self, client_data: &[u8]) -> Option<(u64, Bytes)> {
        let original = ClientData::decode(client_data).ok()?;
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        let correlation_id = CorrelationId::new(&self.correlation_prefix, n);
        let data = ClientData {
            correlation_id: correlation_id.as_str(),
            timestamp_ms: now_ms(),
            timeout_ms: i64::try_from(self.config.request_timeout_ms).unwrap_or(0),
            ..original
        };
        Some((n, encode_pooled(&data)))
    }
}

/// Counts a request on its way into the spool for as long as it lives.
struct Appending<'a>(&'a AtomicUsize);

impl<'a> Appending<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Appending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The `Stored` answer to a routed request.
fn stored(route: &Route) -> KpResponse {
    KpResponse {
        base: route.base.clone(),
        request_id: route.request_id,
        tag: route.tag,
        outcome: KpOutcome::Stored,
    }
}

fn error(route: &Route, e: KpError) -> KpResponse {
    KpResponse {
        base: route.base.clone(),
        request_id: route.request_id,
        tag: route.tag,
        outcome: KpOutcome::Error(e),
    }
}

/// Replays the spool while it holds records and the bus takes them, a window at a time, in
/// order; leaves spool-first mode once it is empty.
pub(crate) async fn forward<B: Bus>(
    gateway: Weak<Gateway<B>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut cursor: Option<u64> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(g) = gateway.upgrade() else { return };
        let Some(spool) = g.delivery.spool.clone() else { return };
        let wake = g.delivery.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let mut pause = Duration::from_millis(500);
        let rewind = g.delivery.rewind.swap(u64::MAX, Ordering::Relaxed);
        if rewind != u64::MAX && cursor.is_some_and(|c| c >= rewind) {
            // Records still in flight are skipped on the way (they are in `replaying`).
            cursor = rewind.checked_sub(1);
        }
        let refusals = g.delivery.refusals.load(Ordering::Relaxed);
        if rewind != u64::MAX && refusals > 0 {
            // The extension answered 5xx: give it time before the next attempt.
            let wait = Duration::from_millis(100u64 << refusals.min(6)).min(Duration::from_secs(5));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = fleetgate_bus::stopped(&mut shutdown) => {}
            }
            continue;
        }
        if spool.is_empty() {
            cursor = None;
            if g.delivery.spooling.swap(false, Ordering::Relaxed) {
                tracing::info!("the spool is empty: requests go straight to the bus again");
            }
        } else if g.delivery.in_flight.load(Ordering::Relaxed) == 0
            && cursor.is_some_and(|c| g.delivery.replaying().is_empty() && c >= spool_last(&spool))
        {
            // Everything was sent once and nothing waits: what is left timed out; start over.
            cursor = None;
        } else if !g.bus.is_healthy() {
            // Nothing would come back: wait for the bus.
            cursor = None;
        } else {
            match g.replay_batch(&spool, cursor).await {
                Ok(last) => {
                    cursor = last;
                    backoff = Duration::from_millis(100);
                }
                Err(()) => {
                    cursor = None;
                    pause = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Held while waiting: shutdown ends this task, not the gateway's last handle.
        tokio::select! {
            () = &mut wake => {}
            () = tokio::time::sleep(pause) => {}
            () = fleetgate_bus::stopped(&mut shutdown) => {
                // What was spooled and removed is on disk before the process goes.
                if let Err(e) = spool.close() {
                    tracing::error!(error = %e, "cannot sync the spool at shutdown");
                }
                return;
            }
        }
    }
}

/// The sequence number of the newest record (or 0).
fn spool_last(spool: &Spool) -> u64 {
    spool.newest().unwrap_or(0)
}
