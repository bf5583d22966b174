//! Requests sent to extensions and not yet answered, by request number, with their deadlines.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;
use fleetgate_bus::Subject;
use fleetgate_transport_core::SessionId;
use fleetgate_transport_core::metrics::Latency;
use tokio::time::Instant;

const SHARDS: u64 = 32;

/// Where the answer to a request goes.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) session: SessionId,
    /// The request's path without request id.
    pub(crate) base: Bytes,
    /// The request id from the path; `None` when the transport asked for an answer to a
    /// request without one.
    pub(crate) request_id: Option<u32>,
    pub(crate) tag: u64,
}

/// What a pending request is, for what to do when its answer or its deadline comes.
#[derive(Debug)]
pub(crate) enum State {
    /// On the bus, not yet durable: kept whole, to be spooled if no answer comes in time.
    Direct { subject: Subject, client_data: Bytes },
    /// A replay of spool record `seq`, or the original of a request spooled after its
    /// deadline (the device heard it is stored) whose answer may still come.
    Replay { seq: u64 },
}

/// A request waiting for its `ExtensionData`.
#[derive(Debug)]
pub(crate) struct Pending {
    /// Who waits for the answer; `None` for replays and requests nobody waits for.
    pub(crate) route: Option<Route>,
    /// When the request went to the bus.
    pub(crate) sent: Instant,
    /// The extension's request latency, observed when the answer (or the deadline) comes.
    pub(crate) latency: Latency,
    pub(crate) state: State,
}

#[derive(Default)]
struct Shard {
    requests: HashMap<u64, Pending>,
    /// Request numbers by deadline; entries already answered are skipped when they come up.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
}

/// Pending requests in shards keyed by request number, so concurrent sessions rarely share a
/// lock and expiry costs O(expired · log n) rather than a scan.
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
        shard.deadlines.push(Reverse((deadline, n)));
        shard.requests.insert(n, pending);
    }

    /// Removes and returns request `n`, if still pending.
    pub(crate) fn take(&self, n: u64) -> Option<Pending> {
        self.shard(n).requests.remove(&n)
    }

    /// Removes and returns every request whose deadline is before `now`, with its number.
    pub(crate) fn expire(&self, now: Instant) -> Vec<(u64, Pending)> {
        let mut expired = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            while let Some(&Reverse((deadline, n))) = shard.deadlines.peek() {
                if deadline > now {
                    break;
                }
                shard.deadlines.pop();
                if let Some(p) = shard.requests.remove(&n) {
                    expired.push((n, p));
                }
            }
            // Answered requests leave their deadline behind; a heap far larger than what is
            // pending is rebuilt rather than kept.
            let Shard { requests, deadlines } = &mut *shard;
            if deadlines.len() > 1024 && deadlines.len() > 4 * requests.len() {
                let kept: BinaryHeap<_> =
                    deadlines.drain().filter(|Reverse((_, n))| requests.contains_key(n)).collect();
                *deadlines = kept;
            }
        }
        expired.sort_unstable_by_key(|(n, _)| *n);
        expired
    }

    /// Requests on the bus that are not durable yet ([`State::Direct`]); walks every shard.
    pub(crate) fn count_direct(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock().map_or(0, |s| {
                    s.requests.values().filter(|p| matches!(p.state, State::Direct { .. })).count()
                })
            })
            .sum()
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
        Pending { route: None, sent, latency: Latency::default(), state: State::Replay { seq: 0 } }
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
        assert!(expired.windows(2).all(|w| w[0].0 < w[1].0), "in request order");
        assert_eq!(t.len(), 50);
        assert_eq!(t.expire(now + Duration::from_secs(1)).len(), 50);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn deadlines_of_different_lengths_expire_in_deadline_order() {
        let t = PendingTable::default();
        let now = Instant::now();
        t.insert(1, pending(now), now + Duration::from_secs(10));
        t.insert(33, pending(now), now + Duration::from_secs(1)); // same shard as 1
        let expired = t.expire(now + Duration::from_secs(2));
        assert_eq!(expired.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [33]);
    }
}
