//! The in-process bus: NATS semantics over bounded tokio channels, for one process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::subject::{is_valid_subject, subject_matches};
use crate::{Bus, BusError, Message, Subject, Subscription, SubscriptionInner};

/// How many distinct subjects keep a cached route before the cache starts over.
const ROUTE_CACHE_LIMIT: usize = 4096;

/// A bus inside one process. Cloning is cheap; clones share subscriptions.
#[derive(Clone)]
pub struct InProcessBus {
    inner: Arc<Inner>,
}

struct Inner {
    state: RwLock<State>,
    /// Capacity of each subscription's channel.
    capacity: usize,
}

#[derive(Default)]
struct State {
    next_id: u64,
    entries: Vec<Entry>,
    /// Resolved targets per published subject; cleared whenever a subscription changes.
    routes: HashMap<String, Arc<Route>>,
}

struct Entry {
    id: u64,
    pattern: String,
    queue_group: Option<String>,
    tx: mpsc::Sender<Message>,
}

/// Who receives a message published to one subject.
#[derive(Default)]
struct Route {
    /// Subscribers outside any queue group: each gets a copy.
    each: Vec<mpsc::Sender<Message>>,
    /// Queue groups: one member of each gets it.
    groups: Vec<QueueGroup>,
}

struct QueueGroup {
    members: Vec<mpsc::Sender<Message>>,
    next: AtomicUsize,
}

impl QueueGroup {
    /// Hands `msg` to one member, round robin, preferring one with room; waits on the chosen
    /// one only when every member is full.
    async fn deliver(&self, msg: Message) -> bool {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut msg = msg;
        for i in 0..n {
            match self.members[(start + i) % n].try_send(msg) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m)) => {
                    msg = m;
                }
            }
        }
        for i in 0..n {
            match self.members[(start + i) % n].send(msg).await {
                Ok(()) => return true,
                Err(mpsc::error::SendError(m)) => msg = m,
            }
        }
        false
    }
}

impl InProcessBus {
    /// A bus whose subscriptions each buffer up to `capacity` messages.
    pub fn new(capacity: usize) -> Self {
        Self { inner: Arc::new(Inner { state: RwLock::default(), capacity: capacity.max(1) }) }
    }

    fn route(&self, subject: &str) -> Arc<Route> {
        if let Ok(state) = self.inner.state.read()
            && let Some(route) = state.routes.get(subject)
        {
            return route.clone();
        }
        let Ok(mut state) = self.inner.state.write() else {
            return Arc::default();
        };
        let mut route = Route::default();
        let mut groups: Vec<(&str, Vec<mpsc::Sender<Message>>)> = Vec::new();
        for entry in state.entries.iter().filter(|e| subject_matches(&e.pattern, subject)) {
            match &entry.queue_group {
                None => route.each.push(entry.tx.clone()),
                Some(q) => match groups.iter_mut().find(|(name, _)| name == q) {
                    Some((_, members)) => members.push(entry.tx.clone()),
                    None => groups.push((q, vec![entry.tx.clone()])),
                },
            }
        }
        route.groups = groups
            .into_iter()
            .map(|(_, members)| QueueGroup { members, next: AtomicUsize::new(0) })
            .collect();
        let route = Arc::new(route);
        if state.routes.len() >= ROUTE_CACHE_LIMIT {
            state.routes.clear();
        }
        state.routes.insert(subject.to_owned(), route.clone());
        route
    }
}

impl Bus for InProcessBus {
    async fn publish(
        &self,
        subject: Subject,
        reply: Option<Subject>,
        payload: Bytes,
    ) -> Result<(), BusError> {
        if !is_valid_subject(&subject, false) {
            return Err(BusError::InvalidSubject(subject.to_string()));
        }
        let route = self.route(&subject);
        let is_request = reply.is_some();
        let msg = Message { subject, reply, payload };
        let mut delivered = false;
        for tx in &route.each {
            delivered |= tx.send(msg.clone()).await.is_ok();
        }
        for group in &route.groups {
            delivered |= group.deliver(msg.clone()).await;
        }
        if !delivered && is_request {
            return Err(BusError::NoResponders(msg.subject.to_string()));
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        subject: &str,
        queue_group: Option<&str>,
    ) -> Result<Subscription, BusError> {
        if !is_valid_subject(subject, true) {
            return Err(BusError::InvalidSubject(subject.to_owned()));
        }
        let (tx, rx) = mpsc::channel(self.inner.capacity);
        let mut state = self.inner.state.write().map_err(|_| BusError::Closed)?;
        state.next_id += 1;
        let id = state.next_id;
        state.entries.push(Entry {
            id,
            pattern: subject.to_owned(),
            queue_group: queue_group.map(str::to_owned),
            tx,
        });
        state.routes.clear();
        Ok(Subscription {
            inner: SubscriptionInner::InProcess(InProcessSubscription {
                rx,
                id,
                bus: Arc::downgrade(&self.inner),
            }),
        })
    }

    async fn flush(&self) -> Result<(), BusError> {
        Ok(())
    }

    /// No limit: messages are handed over in memory.
    fn max_payload(&self) -> usize {
        usize::MAX
    }

    fn is_healthy(&self) -> bool {
        true
    }
}

/// The receiving end of an in-process subscription.
pub(crate) struct InProcessSubscription {
    rx: mpsc::Receiver<Message>,
    id: u64,
    bus: Weak<Inner>,
}

impl InProcessSubscription {
    pub(crate) async fn next(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
}

impl Drop for InProcessSubscription {
    fn drop(&mut self) {
        if let Some(inner) = self.bus.upgrade()
            && let Ok(mut state) = inner.state.write()
        {
            state.entries.retain(|e| e.id != self.id);
            state.routes.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn s(x: &'static str) -> Subject {
        Subject::from_static(x)
    }

    #[tokio::test]
    async fn fan_out_and_wildcards() {
        let bus = InProcessBus::new(8);
        let mut a = bus.subscribe("kaa.v1.events.*.endpoint.>", None).await.expect("sub");
        let mut b = bus.subscribe("kaa.v1.events.dcx.endpoint.x", None).await.expect("sub");
        bus.publish(s("kaa.v1.events.dcx.endpoint.x"), None, Bytes::from_static(b"1"))
            .await
            .expect("publish");
        assert_eq!(a.next().await.map(|m| m.payload), Some(Bytes::from_static(b"1")));
        assert_eq!(b.next().await.map(|m| m.payload), Some(Bytes::from_static(b"1")));
    }

    #[tokio::test]
    async fn queue_group_delivers_to_one_member_each() {
        let bus = InProcessBus::new(64);
        let mut a = bus.subscribe("svc", Some("g")).await.expect("sub");
        let mut b = bus.subscribe("svc", Some("g")).await.expect("sub");
        for _ in 0..10 {
            bus.publish(s("svc"), None, Bytes::new()).await.expect("publish");
        }
        let mut got = 0;
        for sub in [&mut a, &mut b] {
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(20), sub.next()).await
            {
                got += 1;
            }
        }
        assert_eq!(got, 10);
    }

    #[tokio::test]
    async fn request_without_subscriber_is_no_responders() {
        let bus = InProcessBus::new(8);
        let err = bus.publish(s("nobody"), Some(s("me")), Bytes::new()).await;
        assert!(matches!(err, Err(BusError::NoResponders(_))));
        // A plain publish to nobody is fine, as on NATS.
        bus.publish(s("nobody"), None, Bytes::new()).await.expect("publish");
    }

    #[tokio::test]
    async fn dropping_unsubscribes() {
        let bus = InProcessBus::new(8);
        let sub = bus.subscribe("x", Some("g")).await.expect("sub");
        drop(sub);
        let err = bus.publish(s("x"), Some(s("me")), Bytes::new()).await;
        assert!(matches!(err, Err(BusError::NoResponders(_))));
    }

    #[tokio::test]
    async fn publish_waits_when_the_subscriber_is_full() {
        let bus = InProcessBus::new(2);
        let mut sub = bus.subscribe("x", None).await.expect("sub");
        bus.publish(s("x"), None, Bytes::new()).await.expect("1");
        bus.publish(s("x"), None, Bytes::new()).await.expect("2");
        let third = tokio::time::timeout(
            Duration::from_millis(50),
            bus.publish(s("x"), None, Bytes::new()),
        )
        .await;
        assert!(third.is_err(), "a full subscriber must make publish wait");
        sub.next().await.expect("one");
        tokio::time::timeout(Duration::from_secs(1), bus.publish(s("x"), None, Bytes::new()))
            .await
            .expect("room again")
            .expect("publish");
    }

    #[tokio::test]
    async fn rejects_invalid_subjects() {
        let bus = InProcessBus::new(8);
        assert!(bus.subscribe("a..b", None).await.is_err());
        assert!(bus.publish(s("a.*"), None, Bytes::new()).await.is_err());
    }
}
