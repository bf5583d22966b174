//! The message bus between fleetgate services.
//!
//! One trait, [`Bus`], with two implementations: [`InProcessBus`] (the default, for `fleetgate
//! up` on one machine: no network, bounded channels) and [`NatsBus`] (3/ISM over a NATS server,
//! for replicas). [`AnyBus`] picks one at run time without dynamic dispatch. Both follow NATS
//! semantics: `.`-separated subjects with `*` and `>` wildcards, queue groups that hand each
//! message to one member, and an optional reply subject per message. [`Requester`] correlates
//! replies by the 3/ISM `correlationId`.
//!
//! Publishing is bounded in both: when subscribers (in-process) or the NATS connection are
//! slow, `publish` waits, so that whoever reads from devices slows down instead of buffering.
//!
//! This crate moves bytes; it does not know the Avro records (see `fleetgate-messages`).

mod in_process;
mod nats;
mod requester;
mod subject;

use std::future::Future;

use bytes::Bytes;

pub use async_nats::Subject;
pub use in_process::InProcessBus;
pub use nats::{NatsBus, NatsOptions};
pub use requester::Requester;
pub use subject::{is_valid_subject, subject_matches};

/// One message on the bus.
#[derive(Debug, Clone)]
pub struct Message {
    /// The subject it was published to.
    pub subject: Subject,
    /// Where the receiver should answer, if anywhere.
    pub reply: Option<Subject>,
    /// The payload (an Avro datum for every 3/ISM message).
    pub payload: Bytes,
}

/// Why a bus operation failed. Always the backend's or the configuration's fault, never a
/// device's.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A request (a message with a reply subject) found no subscriber at all. Only the
    /// in-process bus can know this; on NATS the request times out instead.
    #[error("no subscriber for `{0}`")]
    NoResponders(String),
    /// The subject is not a valid NATS subject.
    #[error("invalid subject `{0}`")]
    InvalidSubject(String),
    /// The message is larger than the bus carries (NATS `max_payload`). Only this message is
    /// refused; the bus goes on.
    #[error("a message of {size} bytes is over the bus's limit of {max} bytes")]
    TooLarge {
        /// The message's payload size.
        size: usize,
        /// The largest payload the bus carries.
        max: usize,
    },
    /// The bus was shut down.
    #[error("the bus is closed")]
    Closed,
    /// No answer within the time allowed.
    #[error("no reply on `{0}` in time")]
    Timeout(String),
    /// The NATS server could not be reached.
    #[error("cannot connect to NATS at {url}")]
    Connect {
        /// The URL tried.
        url: String,
        /// What the client said.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The NATS client refused an operation.
    #[error("NATS refused to {operation}")]
    Nats {
        /// What was refused: `subscribe`, `publish`, `flush`.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A stream of messages from [`Bus::subscribe`]. Dropping it unsubscribes.
pub struct Subscription {
    inner: SubscriptionInner,
}

enum SubscriptionInner {
    InProcess(in_process::InProcessSubscription),
    Nats(async_nats::Subscriber),
}

impl Subscription {
    /// The next message, or `None` once the bus is gone.
    pub async fn next(&mut self) -> Option<Message> {
        match &mut self.inner {
            SubscriptionInner::InProcess(sub) => sub.next().await,
            SubscriptionInner::Nats(sub) => {
                use futures_util::StreamExt;
                loop {
                    let m = sub.next().await?;
                    // Status messages (no responders and the like) carry no 3/ISM payload.
                    if m.status.is_some() && m.payload.is_empty() {
                        continue;
                    }
                    return Some(Message {
                        subject: m.subject,
                        reply: m.reply,
                        payload: m.payload,
                    });
                }
            }
        }
    }
}

/// A 3/ISM message bus.
pub trait Bus: Clone + Send + Sync + 'static {
    /// Publishes `payload` to `subject`, asking for answers on `reply`. Returns when the bus
    /// has accepted the message (in-process: queued to every receiver; NATS: queued in the
    /// bus's bounded publish queue, which one writer drains into the client in order), waiting
    /// while it is full.
    fn publish(
        &self,
        subject: Subject,
        reply: Option<Subject>,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Subscribes to `subject` (wildcards allowed), in `queue_group` when given: each message
    /// then goes to one member of the group.
    fn subscribe(
        &self,
        subject: &str,
        queue_group: Option<&str>,
    ) -> impl Future<Output = Result<Subscription, BusError>> + Send;

    /// Waits until everything subscribed and published so far has reached the bus (NATS: a
    /// round trip through the server).
    fn flush(&self) -> impl Future<Output = Result<(), BusError>> + Send;

    /// The largest payload one message may carry (NATS: the server's `max_payload`, learned
    /// at connect); a larger one is refused with [`BusError::TooLarge`].
    fn max_payload(&self) -> usize;

    /// Whether the bus carries messages now (NATS: connected, and a round trip through the
    /// server came back in time at the last probe). Cheap: a flag a probe keeps up to date.
    fn is_healthy(&self) -> bool;
}

/// The bus chosen by configuration: in-process unless a NATS URL is set.
#[derive(Clone)]
pub enum AnyBus {
    /// In-process channels.
    InProcess(InProcessBus),
    /// A NATS connection.
    Nats(NatsBus),
}

impl Bus for AnyBus {
    async fn publish(
        &self,
        subject: Subject,
        reply: Option<Subject>,
        payload: Bytes,
    ) -> Result<(), BusError> {
        match self {
            AnyBus::InProcess(b) => b.publish(subject, reply, payload).await,
            AnyBus::Nats(b) => b.publish(subject, reply, payload).await,
        }
    }

    async fn subscribe(
        &self,
        subject: &str,
        queue_group: Option<&str>,
    ) -> Result<Subscription, BusError> {
        match self {
            AnyBus::InProcess(b) => b.subscribe(subject, queue_group).await,
            AnyBus::Nats(b) => b.subscribe(subject, queue_group).await,
        }
    }

    async fn flush(&self) -> Result<(), BusError> {
        match self {
            AnyBus::InProcess(b) => b.flush().await,
            AnyBus::Nats(b) => b.flush().await,
        }
    }

    fn max_payload(&self) -> usize {
        match self {
            AnyBus::InProcess(b) => b.max_payload(),
            AnyBus::Nats(b) => b.max_payload(),
        }
    }

    fn is_healthy(&self) -> bool {
        match self {
            AnyBus::InProcess(b) => b.is_healthy(),
            AnyBus::Nats(b) => b.is_healthy(),
        }
    }
}

impl AnyBus {
    /// `in-process` or `nats`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyBus::InProcess(_) => "in-process",
            AnyBus::Nats(_) => "nats",
        }
    }
}

/// Milliseconds since the Unix epoch, the unit of every 3/ISM `timestamp`.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Whether a 3/ISM message created at `timestamp_ms` with `timeout_ms` (0: never) has expired.
pub fn is_expired(timestamp_ms: i64, timeout_ms: i64) -> bool {
    timeout_ms > 0 && now_ms() > timestamp_ms.saturating_add(timeout_ms)
}

/// A replica id for a service instance: `<instance>-<8 hex digits>`, unique per process start.
/// Replica ids are subject tokens (`kaa.v1.replica.<id>...`), so they contain no `.`.
pub fn new_replica_id(instance: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_i64(now_ms());
    format!("{instance}-{:08x}", h.finish() as u32)
}

/// Resolves once `shutdown` turns true (or its sender is gone): the stop signal every service
/// loop selects on.
pub async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
