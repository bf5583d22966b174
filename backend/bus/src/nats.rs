//! The NATS bus (3/ISM) through `async-nats`.
//!
//! Publishing goes through a queue of this crate's that one writer task drains into the client
//! in batches. Handed straight to `async-nats`, each publish wakes the client's connection task,
//! which tokio runs right after the publisher (its "LIFO slot"): one `writev` to the server per
//! message, and on a shared core a context switch into nats-server for each. The writer instead
//! hands over at most one batch per [`NatsOptions::publish_linger`]: a message that comes after
//! a quiet spell goes at once, and under load the next batch waits until the linger since the
//! previous one is over (or until [`NatsOptions::publish_batch`] messages are queued).
//! nats-server's cost is mostly per read, not per message, so fewer and larger writes cut its CPU
//! as well as ours; the price is up to that much latency under load, so it is off by default.
//! A flush does not linger.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::PublishErrorKind;
use bytes::Bytes;
use tokio::sync::{Notify, oneshot};

use crate::{Bus, BusError, Subject, Subscription, SubscriptionInner};

/// Connection settings for [`NatsBus::connect`].
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `nats://host:port`; several separated by commas.
    pub url: String,
    /// Connection name shown by the NATS server (the service replica id).
    pub name: String,
    /// How many outgoing messages the client buffers before `publish` waits.
    pub publish_capacity: usize,
    /// How many incoming messages each subscription buffers before the server's
    /// slow-consumer handling applies.
    pub subscription_capacity: usize,
    /// How long the first connection attempt may take.
    pub connect_timeout: Duration,
    /// The shortest time between two batches handed to the server: a batch that would follow
    /// the previous one sooner waits for more messages instead. Zero: a batch is only what the
    /// tasks that are ready at that moment queue. Tokio's timer counts whole milliseconds.
    pub publish_linger: Duration,
    /// A batch this large goes at once, without waiting out the linger.
    pub publish_batch: usize,
    /// How often the health probe sends a round trip through the server.
    pub health_interval: Duration,
    /// A round trip that takes longer makes the bus unhealthy (stalled) until one comes back
    /// in time.
    pub health_timeout: Duration,
}

impl NatsOptions {
    /// Defaults for `url`, named `name`.
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            publish_capacity: 8192,
            subscription_capacity: 65536,
            connect_timeout: Duration::from_secs(5),
            publish_linger: Duration::ZERO,
            publish_batch: 256,
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_secs(2),
        }
    }
}

/// A bus on a NATS server. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    publisher: Arc<Publisher>,
    /// Kept up to date by the health probe.
    healthy: Arc<AtomicBool>,
}

/// One entry of the publish queue.
enum Outgoing {
    Message {
        subject: Subject,
        reply: Option<Subject>,
        payload: Bytes,
    },
    /// Everything queued before has been handed to the client.
    Mark(oneshot::Sender<()>),
}

/// The publish queue's state, shared with its writer task.
struct PublishQueue {
    state: Mutex<QueueState>,
    /// Wakes the writer when the queue stops being empty (or closes).
    writer: Notify,
    /// Wakes publishers waiting for room.
    room: Notify,
    capacity: usize,
    /// Queued messages that wake the writer before its linger is over.
    batch: usize,
}

struct QueueState {
    queue: Vec<Outgoing>,
    /// A flush mark is queued: the writer must not linger.
    urgent: bool,
    /// The last bus handle is gone, or the client refused a message (it has shut down).
    closed: bool,
}

/// Why [`PublishQueue::try_push`] did not queue an entry.
enum Refused {
    /// No room; the entry comes back.
    Full(Outgoing),
    /// The client has shut down.
    Closed,
}

impl PublishQueue {
    /// Every update leaves the state consistent, so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `entry` if there is room (marks always fit).
    fn try_push(&self, entry: Outgoing) -> Result<(), Refused> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        let mark = matches!(entry, Outgoing::Mark(_));
        if !mark && state.queue.len() >= self.capacity {
            return Err(Refused::Full(entry));
        }
        state.queue.push(entry);
        state.urgent |= mark;
        // The first entry wakes the writer; a full batch or a mark cuts its linger short.
        let wake = state.queue.len() == 1 || state.queue.len() == self.batch || mark;
        drop(state);
        if wake {
            self.writer.notify_one();
        }
        Ok(())
    }

    /// Whether the writer should wait for more before taking the queue.
    fn worth_waiting_for(&self) -> bool {
        let state = self.lock();
        !state.closed && !state.urgent && state.queue.len() < self.batch
    }

    async fn push(&self, mut entry: Outgoing) -> Result<(), BusError> {
        loop {
            // Registered before trying, so that room made in between is not missed.
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_push(entry) {
                Ok(()) => return Ok(()),
                Err(Refused::Full(back)) => entry = back,
                Err(Refused::Closed) => return Err(BusError::Closed),
            }
            room.await;
        }
    }
}

/// The publishing side of a [`NatsBus`]; when the last clone goes, the writer sends what is
/// queued and stops.
struct Publisher {
    queue: Arc<PublishQueue>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.writer.notify_one();
    }
}

/// Drains the publish queue into the client, a batch at a time, in order.
async fn write_batches(client: async_nats::Client, queue: Arc<PublishQueue>, linger: Duration) {
    let mut batch = Vec::new();
    // As if the previous batch went a linger ago: the first message does not wait.
    let now = tokio::time::Instant::now();
    let mut last_write = now.checked_sub(linger).unwrap_or(now);
    loop {
        queue.writer.notified().await;
        // Let the tasks that are ready now queue their messages too.
        tokio::task::yield_now().await;
        // The linger counts from the previous batch: after a quiet spell a message goes at
        // once, under load batches go out at most once per linger.
        let deadline = last_write + linger;
        if tokio::time::Instant::now() < deadline && queue.worth_waiting_for() {
            // Over at the deadline, or when a full batch, a flush mark or closing wakes us.
            let _ = tokio::time::timeout_at(deadline, queue.writer.notified()).await;
        }
        let closed = {
            let mut state = queue.lock();
            std::mem::swap(&mut batch, &mut state.queue);
            state.urgent = false;
            state.closed
        };
        if !batch.is_empty() {
            last_write = tokio::time::Instant::now();
        }
        queue.room.notify_waiters();
        for entry in batch.drain(..) {
            match entry {
                Outgoing::Message { subject, reply, payload } => {
                    let result = match reply {
                        Some(reply) => client.publish_with_reply(subject, reply, payload).await,
                        None => client.publish(subject, payload).await,
                    };
                    match result {
                        Ok(()) => {}
                        // One message the client refuses (checked in `publish` already, but the
                        // server's limit may have shrunk on a reconnect): that message only.
                        Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                            tracing::warn!(error = %e, "NATS refused an oversized message");
                        }
                        Err(e) => {
                            // The client has shut down; later publishes fail.
                            let was_closed = std::mem::replace(&mut queue.lock().closed, true);
                            if !was_closed {
                                tracing::warn!(error = %e, "NATS client closed: messages not sent");
                                queue.room.notify_waiters();
                            }
                        }
                    }
                }
                Outgoing::Mark(done) => {
                    let _ = done.send(());
                }
            }
        }
        if closed {
            break;
        }
        // A batch that grew large keeps its memory only while batches stay large.
        if batch.capacity() > 4 * 1024 {
            batch = Vec::new();
        }
    }
}

impl NatsBus {
    /// Connects; fails if the server cannot be reached within the connect timeout. Later
    /// disconnections are retried forever in the background.
    pub async fn connect(options: &NatsOptions) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name(&options.name)
            .client_capacity(options.publish_capacity)
            .subscription_capacity(options.subscription_capacity)
            .connection_timeout(options.connect_timeout)
            .max_reconnects(None)
            .connect(options.url.as_str())
            .await
            .map_err(|source| BusError::Connect { url: options.url.clone(), source })?;
        let queue = Arc::new(PublishQueue {
            state: Mutex::new(QueueState { queue: Vec::new(), urgent: false, closed: false }),
            writer: Notify::new(),
            room: Notify::new(),
            capacity: options.publish_capacity.max(1),
            batch: options.publish_batch.max(1),
        });
        tokio::spawn(write_batches(client.clone(), queue.clone(), options.publish_linger));
        let healthy = Arc::new(AtomicBool::new(true));
        let bus = Self { client, publisher: Arc::new(Publisher { queue }), healthy };
        tokio::spawn(probe_health(
            Arc::downgrade(&bus.publisher),
            bus.client.clone(),
            bus.healthy.clone(),
            options.health_interval,
            options.health_timeout,
        ));
        Ok(bus)
    }

    /// Whether the connection is up.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// Keeps `healthy` up to date: connected, and a round trip through the server (behind
/// everything queued for publishing) back within `timeout`. A stopped server (SIGSTOP) keeps
/// the TCP connection up while it answers nothing; only a round trip tells.
async fn probe_health(
    publisher: std::sync::Weak<Publisher>,
    client: async_nats::Client,
    healthy: Arc<AtomicBool>,
    interval: Duration,
    timeout: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(publisher) = publisher.upgrade() else { return };
        let bus = NatsBus { client: client.clone(), publisher, healthy: healthy.clone() };
        let ok = bus.is_connected()
            && tokio::time::timeout(timeout, bus.flush()).await.is_ok_and(|r| r.is_ok());
        if healthy.swap(ok, Ordering::Relaxed) != ok {
            match ok {
                true => tracing::info!("NATS answers again"),
                false => tracing::warn!("NATS is unreachable or stalled"),
            }
        }
    }
}

impl Bus for NatsBus {
    async fn publish(
        &self,
        subject: Subject,
        reply: Option<Subject>,
        payload: Bytes,
    ) -> Result<(), BusError> {
        // Refused here, for this message alone: handed to the client, an oversized message would
        // fail in the writer, where nobody waits for the answer.
        let max = self.client.max_payload();
        if payload.len() > max {
            return Err(BusError::TooLarge { size: payload.len(), max });
        }
        let queue = &self.publisher.queue;
        // The common case without a future at all: there is room.
        match queue.try_push(Outgoing::Message { subject, reply, payload }) {
            Ok(()) => Ok(()),
            Err(Refused::Full(entry)) => queue.push(entry).await,
            Err(Refused::Closed) => Err(BusError::Closed),
        }
    }

    async fn subscribe(
        &self,
        subject: &str,
        queue_group: Option<&str>,
    ) -> Result<Subscription, BusError> {
        if !crate::is_valid_subject(subject, true) {
            return Err(BusError::InvalidSubject(subject.to_owned()));
        }
        let subject = subject.to_owned();
        let sub = match queue_group {
            Some(q) => self.client.queue_subscribe(subject, q.to_owned()).await,
            None => self.client.subscribe(subject).await,
        }
        .map_err(|e| BusError::Nats { operation: "subscribe", source: e.into() })?;
        Ok(Subscription { inner: SubscriptionInner::Nats(sub) })
    }

    /// The server's `max_payload` (1 MiB unless configured otherwise), as of the last connect.
    fn max_payload(&self) -> usize {
        self.client.max_payload()
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.is_connected()
    }

    /// Waits for a round trip through the server, so that every subscription and message
    /// sent before has been processed by it (a socket flush alone does not guarantee that).
    async fn flush(&self) -> Result<(), BusError> {
        use futures_util::StreamExt;
        let nats = |operation: &'static str| {
            move |e: Box<dyn std::error::Error + Send + Sync>| BusError::Nats {
                operation,
                source: e,
            }
        };
        // First everything queued here, in order, into the client.
        let (mark, handed_over) = oneshot::channel();
        self.publisher.queue.push(Outgoing::Mark(mark)).await?;
        handed_over.await.map_err(|_| BusError::Closed)?;
        let inbox = self.client.new_inbox();
        let mut probe =
            self.client.subscribe(inbox.clone()).await.map_err(|e| nats("subscribe")(e.into()))?;
        let probed = self.client.publish(inbox.clone(), Bytes::new()).await;
        probed.map_err(|e| nats("publish")(e.into()))?;
        self.client.flush().await.map_err(|e| nats("flush")(e.into()))?;
        match tokio::time::timeout(Duration::from_secs(10), probe.next()).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(BusError::Closed),
            Err(_) => Err(BusError::Timeout(inbox)),
        }
    }
}
