//! Requests sent to extensions and not yet answered, by request number, with their deadlines.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use fleetgate_transport_core::SessionId;
use fleetgate_transport_core::metrics::Latency;
use tokio::time::Instant;

const SHARDS: u64 = 32;

/// A request waiting for its `ExtensionData`.
pub(crate) struct Pending {
    pub(crate) session: SessionId,
    /// The request's path without request id: where the answer goes.
    pub(crate) base: Bytes,
    /// The request id from the path; `None` when the transport asked for an answer to a
    /// request without one.
    pub(crate) request_id: Option<u32>,
    pub(crate) tag: u64,
    /// When the request went to the bus.
    pub(crate) sent: Instant,
    /// The extension's request latency, observed when the answer (or the timeout) comes.
    pub(crate) latency: Latency,
}

#[derive(Default)]
struct Shard {
    requests: HashMap<u64, Pending>,
    /// Request numbers in deadline order (every request has the same timeout, so insertion
    /// order is deadline order); entries already answered are skipped when they come up.
    deadlines: VecDeque<(Instant, u64)>,
}

/// Pending requests in shards keyed by request number, so concurrent sessions rarely share a
/// lock and expiry costs O(expired) rather than a scan.
pub(crate) struct PendingTable {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for PendingTable {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| Mutex::default()).collect() }
    }
}

impl PendingTable {
    fn shard(&self, n: u64) -> std::sync::MutexGuard<'_, Shard> {
        let i = usize::try_from(n % SHARDS).unwrap_or(0);
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers request `n`, to expire at `deadline` unless taken before.
    pub(crate) fn insert(&self, n: u64, pending: Pending, deadline: Instant) {
        let mut shard = self.shard(n);
        shard.deadlines.push_back((deadline, n));
        shard.requests.insert(n, pending);
    }

    /// Removes and returns request `n`, if still pending.
    pub(crate) fn take(&self, n: u64) -> Option<Pending> {
        self.shard(n).requests.remove(&n)
    }

    /// Removes and returns every request whose deadline is before `now`.
    pub(crate) fn expire(&self, now: Instant) -> Vec<Pending> {
        let mut expired = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            while let Some(&(deadline, n)) = shard.deadlines.front() {
                if deadline > now {
                    break;
                }
                shard.deadlines.pop_front();
                if let Some(p) = shard.requests.remove(&n) {
                    expired.push(p);
                }
            }
        }
        expired
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map_or(0, |s| s.requests.len())).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn pending(sent: Instant) -> Pending {
        let latency = Latency::default();
        Pending {
            session: SessionId(1),
            base: Bytes::new(),
            request_id: Some(1),
            tag: 0,
            sent,
            latency,
        }
    }

    #[test]
    fn answered_requests_do_not_expire() {
        let t = PendingTable::default();
        let now = Instant::now();
        for n in 0..100 {
            t.insert(n, pending(now), now + Duration::from_millis(n));
        }
        assert!(t.take(5).is_some());
        assert!(t.take(5).is_none());
        let expired = t.expire(now + Duration::from_millis(49));
        assert_eq!(expired.len(), 49, "0..=49 minus the answered one");
        assert_eq!(t.len(), 50);
        assert_eq!(t.expire(now + Duration::from_secs(1)).len(), 50);
        assert_eq!(t.len(), 0);
    }
}
