//! Per-peer queues: a reader hands each datagram to the task that owns its peer.

use std::collections::HashMap;
use std::hash::Hash;

use tokio::sync::mpsc;

/// What became of an item [`PeerQueues::route`] could not queue; the item comes back.
#[derive(Debug)]
pub enum Routed<T> {
    /// The peer's queue is full: its task is behind. Drop the item (a datagram is retried by
    /// its sender) and count it.
    Full(T),
    /// No task owns this peer (never had one, or it ended): start one with
    /// [`PeerQueues::insert`] if the item deserves state.
    NoPeer(T),
}

/// Bounded queues to the tasks that own each peer, keyed by whatever names a peer (its address
/// for CoAP; a session id for protocols whose sessions outlive an address). A reader owns one
/// and never waits on a peer task: a slow peer loses its own datagrams, nobody else's.
pub struct PeerQueues<K, T> {
    queues: HashMap<K, mpsc::Sender<T>>,
    capacity: usize,
}

impl<K: Hash + Eq, T> PeerQueues<K, T> {
    /// Queues of `capacity` items each (at least one).
    pub fn new(capacity: usize) -> Self {
        Self { queues: HashMap::new(), capacity: capacity.max(1) }
    }

    /// Queues `item` for the task that owns `key`, without waiting.
    pub fn route(&mut self, key: &K, item: T) -> Result<(), Routed<T>> {
        let Some(queue) = self.queues.get(key) else {
            return Err(Routed::NoPeer(item));
        };
        match queue.try_send(item) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(item)) => Err(Routed::Full(item)),
            Err(mpsc::error::TrySendError::Closed(item)) => {
                self.queues.remove(key);
                Err(Routed::NoPeer(item))
            }
        }
    }

    /// A new queue for `key` with `first` in it; the returned receiver belongs to the task
    /// that will own the peer.
    pub fn insert(&mut self, key: K, first: T) -> mpsc::Receiver<T> {
        let (queue, receiver) = mpsc::channel(self.capacity);
        let _ = queue.try_send(first);
        self.queues.insert(key, queue);
        receiver
    }

    /// Drops the queue of `key`: its task sees the end of its queue once it has taken what is
    /// in it. False when no live task owned `key`.
    pub fn remove(&mut self, key: &K) -> bool {
        self.queues.remove(key).is_some_and(|q| !q.is_closed())
    }

    /// Forgets the queues whose task has ended.
    pub fn sweep(&mut self) {
        self.queues.retain(|_, queue| !queue.is_closed());
    }

    /// Whether a live task owns `key`.
    pub fn contains(&self, key: &K) -> bool {
        self.queues.get(key).is_some_and(|q| !q.is_closed())
    }

    /// Peers with a queue now.
    pub fn len(&self) -> usize {
        self.queues.len()
    }

    /// Whether no peer has a queue.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn routes_to_the_owner_and_reports_full_and_gone_peers() {
        let mut queues = PeerQueues::new(2);
        assert!(matches!(queues.route(&1, 'a'), Err(Routed::NoPeer('a'))));
        let mut rx = queues.insert(1, 'a');
        queues.route(&1, 'b').unwrap();
        assert!(matches!(queues.route(&1, 'c'), Err(Routed::Full('c'))));
        assert_eq!(rx.try_recv().unwrap(), 'a');
        drop(rx);
        assert!(matches!(queues.route(&1, 'd'), Err(Routed::NoPeer('d'))));
        assert!(queues.is_empty());
        let rx = queues.insert(2, 'e');
        drop(rx);
        queues.sweep();
        assert_eq!(queues.len(), 0);
    }
}
