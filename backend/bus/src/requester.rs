//! Request and reply over the bus, correlated by the 3/ISM `correlationId`.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::{Bus, BusError, Message, Subject};

const SHARDS: usize = 16;

type Pending = Mutex<HashMap<String, oneshot::Sender<Message>>>;

/// Sends requests with this replica's reply subject and hands each reply to the caller that
/// waits for its correlation id. Sharded so that concurrent requests do not share one lock.
pub struct Requester<B: Bus> {
    bus: B,
    reply_subject: Subject,
    shared: Arc<Shared>,
}

struct Shared {
    shards: [Pending; SHARDS],
    hasher: RandomState,
}

impl Shared {
    fn shard(&self, correlation_id: &str) -> &Pending {
        let i = (self.hasher.hash_one(correlation_id) as usize) % SHARDS;
        &self.shards[i]
    }
}

/// Removes a pending entry when the waiting caller gives up.
struct PendingGuard<'a> {
    shared: &'a Shared,
    correlation_id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.shared.shard(self.correlation_id).lock() {
            map.remove(self.correlation_id);
        }
    }
}

impl<B: Bus> Requester<B> {
    /// Subscribes to `reply_subject` (this replica's own) and starts routing replies.
    /// `correlation_of` reads the correlation id out of a reply payload.
    pub async fn start(
        bus: B,
        reply_subject: Subject,
        correlation_of: fn(&[u8]) -> Option<&str>,
    ) -> Result<Self, BusError> {
        let mut sub = bus.subscribe(&reply_subject, None).await?;
        let shared = Arc::new(Shared {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            hasher: RandomState::new(),
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(shared) = weak.upgrade() else { break };
                let Some(id) = correlation_of(&msg.payload) else {
                    tracing::debug!(subject = %msg.subject, "reply without a readable correlationId dropped");
                    continue;
                };
                let waiter = shared.shard(id).lock().ok().and_then(|mut m| m.remove(id));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(msg);
                    }
                    None => tracing::debug!(correlation_id = id, "late or unknown reply dropped"),
                }
            }
        });
        Ok(Self { bus, reply_subject, shared })
    }

    /// The subject replies come to.
    pub fn reply_subject(&self) -> &Subject {
        &self.reply_subject
    }

    /// Publishes `payload` to `subject` and waits up to `timeout` for the reply carrying
    /// `correlation_id`.
    pub async fn request(
        &self,
        subject: Subject,
        correlation_id: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .shard(correlation_id)
            .lock()
            .map_err(|_| BusError::Closed)?
            .insert(correlation_id.to_owned(), tx);
        let _guard = PendingGuard { shared: &self.shared, correlation_id };
        self.bus.publish(subject.clone(), Some(self.reply_subject.clone()), payload).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(BusError::Closed),
            Err(_) => Err(BusError::Timeout(subject.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InProcessBus;

    fn first_line(payload: &[u8]) -> Option<&str> {
        std::str::from_utf8(payload).ok()?.split('\n').next()
    }

    #[tokio::test]
    async fn replies_reach_their_callers() {
        let bus = InProcessBus::new(16);
        let mut server = bus.subscribe("svc.req", Some("svc")).await.expect("sub");
        let responder = bus.clone();
        tokio::spawn(async move {
            while let Some(m) = server.next().await {
                let Some(reply) = m.reply else { continue };
                let body = format!("{}\nanswer", first_line(&m.payload).unwrap_or(""));
                let _ = responder.publish(reply, None, Bytes::from(body)).await;
            }
        });
        let requester = Requester::start(bus.clone(), Subject::from_static("me.reply"), first_line)
            .await
            .expect("start");
        let (a, b) = tokio::join!(
            requester.request(
                Subject::from_static("svc.req"),
                "1",
                Bytes::from("1"),
                Duration::from_secs(1)
            ),
            requester.request(
                Subject::from_static("svc.req"),
                "2",
                Bytes::from("2"),
                Duration::from_secs(1)
            ),
        );
        assert_eq!(&a.expect("a").payload[..], b"1\nanswer");
        assert_eq!(&b.expect("b").payload[..], b"2\nanswer");
    }

    #[tokio::test]
    async fn times_out_and_forgets() {
        let bus = InProcessBus::new(16);
        let _silent = bus.subscribe("svc.req", Some("svc")).await.expect("sub");
        let requester = Requester::start(bus, Subject::from_static("me.reply"), first_line)
            .await
            .expect("start");
        let r = requester
            .request(Subject::from_static("svc.req"), "1", Bytes::new(), Duration::from_millis(20))
            .await;
        assert!(matches!(r, Err(BusError::Timeout(_))));
        let pending: usize =
            requester.shared.shards.iter().map(|s| s.lock().map(|m| m.len()).unwrap_or(0)).sum();
        assert_eq!(pending, 0);
    }
}
