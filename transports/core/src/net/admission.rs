//! Admission of new connections: a cap on connections open in total and per source address,
//! and a token bucket per source address on how fast new ones may come. A connection refused
//! here is closed at once, before anything (a TLS handshake, a read buffer) is spent on it.
//!
//! The limits are passed in at every admission, so that a configuration reload applies to the
//! next connection; the counts live in one [`Admission`] per listener. The per-address table
//! holds an entry while the address has a connection open or its bucket is still refilling,
//! so it is bounded by the open connections plus the addresses seen in the last few seconds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The limits an admission applies. 0 means no limit for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectionLimits {
    /// Connections open at once.
    pub max_connections: u32,
    /// Connections open at once from one source address.
    pub max_per_address: u32,
    /// New connections per second from one source address (the bucket's refill rate).
    pub new_per_address_per_sec: u32,
    /// New connections one source address may open at once after a quiet spell (the bucket's
    /// size); at least 1 when the rate is limited.
    pub new_per_address_burst: u32,
}

/// Why a connection was refused: the `reason` label of the refusal metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` are open.
    Total,
    /// `max_per_address` are open from its address.
    PerAddress,
    /// Its address opens connections faster than the bucket allows.
    Rate,
}

impl Refusal {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::PerAddress => "per_address",
            Refusal::Rate => "rate",
        }
    }
}

/// The counts of one listener (shared by its accept loop and its connections).
#[derive(Debug, Default)]
pub struct Admission {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    open: u32,
    addresses: HashMap<IpAddr, Address>,
    /// Admissions since the table was last swept of entries that hold nothing.
    since_sweep: u32,
}

#[derive(Debug)]
struct Address {
    open: u32,
    /// Tokens in the bucket as of `at`.
    tokens: f32,
    at: Instant,
}

impl Address {
    /// Refills the bucket up to `now`.
    fn refill(&mut self, limits: &ConnectionLimits, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f32();
        let burst = limits.new_per_address_burst.max(1) as f32;
        self.tokens = (self.tokens + elapsed * limits.new_per_address_per_sec as f32).min(burst);
        self.at = now;
    }

    /// Whether the entry holds nothing worth keeping: no connection open and a full bucket.
    fn is_idle(&self, limits: &ConnectionLimits, now: Instant) -> bool {
        if self.open > 0 {
            return false;
        }
        if limits.new_per_address_per_sec == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f32();
        let burst = limits.new_per_address_burst.max(1) as f32;
        self.tokens + elapsed * limits.new_per_address_per_sec as f32 >= burst
    }
}

/// Sweep the table every this many admissions.
const SWEEP_EVERY: u32 = 1024;

impl Admission {
    /// A listener's empty counts.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Admits a connection from `peer` at `now` under `limits`, or says why not. The returned
    /// [`Admitted`] counts the connection as open until it is dropped.
    pub fn admit(
        self: &Arc<Self>,
        peer: IpAddr,
        limits: &ConnectionLimits,
        now: Instant,
    ) -> Result<Admitted, Refusal> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if limits.max_connections > 0 && state.open >= limits.max_connections {
            return Err(Refusal::Total);
        }
        state.since_sweep += 1;
        if state.since_sweep >= SWEEP_EVERY {
            state.since_sweep = 0;
            state.addresses.retain(|_, a| !a.is_idle(limits, now));
        }
        let limited = limits.max_per_address > 0 || limits.new_per_address_per_sec > 0;
        if limited {
            let burst = limits.new_per_address_burst.max(1) as f32;
            let address =
                state.addresses.entry(peer).or_insert(Address { open: 0, tokens: burst, at: now });
            if limits.max_per_address > 0 && address.open >= limits.max_per_address {
                return Err(Refusal::PerAddress);
            }
            if limits.new_per_address_per_sec > 0 {
                address.refill(limits, now);
                if address.tokens < 1.0 {
                    return Err(Refusal::Rate);
                }
                address.tokens -= 1.0;
            }
            address.open += 1;
        }
        state.open += 1;
        let refilling = limits.new_per_address_per_sec > 0;
        Ok(Admitted { admission: self.clone(), peer: limited.then_some(peer), refilling })
    }

    /// Connections open now.
    pub fn open(&self) -> u32 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).open
    }

    /// Entries in the per-address table (for tests of its bound).
    pub fn addresses(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).addresses.len()
    }
}

/// One admitted connection; dropping it counts the connection closed.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    /// Its address, when it was counted in the per-address table.
    peer: Option<IpAddr>,
    /// Whether its address's entry keeps a bucket that refills after the connection ends.
    refilling: bool,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut state = self.admission.state.lock().unwrap_or_else(|e| e.into_inner());
        state.open = state.open.saturating_sub(1);
        if let Some(peer) = self.peer
            && let Some(address) = state.addresses.get_mut(&peer)
        {
            address.open = address.open.saturating_sub(1);
            // Kept while its bucket refills (a later sweep drops it); dropped now when it
            // has none to refill.
            if address.open == 0 && !self.refilling {
                state.addresses.remove(&peer);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn caps_total_and_per_address_until_connections_close() {
        let limits =
            ConnectionLimits { max_connections: 3, max_per_address: 2, ..Default::default() };
        let a = Admission::new();
        let now = Instant::now();
        let first = a.admit(ip(1), &limits, now).unwrap();
        let _second = a.admit(ip(1), &limits, now).unwrap();
        assert_eq!(a.admit(ip(1), &limits, now).unwrap_err(), Refusal::PerAddress);
        let _third = a.admit(ip(2), &limits, now).unwrap();
        assert_eq!(a.admit(ip(3), &limits, now).unwrap_err(), Refusal::Total);
        drop(first);
        assert_eq!(a.open(), 2);
        let _again = a.admit(ip(1), &limits, now).unwrap();
    }

    #[test]
    fn the_bucket_limits_the_rate_per_address_only() {
        let limits = ConnectionLimits {
            new_per_address_per_sec: 10,
            new_per_address_burst: 2,
            ..Default::default()
        };
        let a = Admission::new();
        let t0 = Instant::now();
        let mut kept = Vec::new();
        kept.push(a.admit(ip(1), &limits, t0).unwrap());
        kept.push(a.admit(ip(1), &limits, t0).unwrap());
        assert_eq!(a.admit(ip(1), &limits, t0).unwrap_err(), Refusal::Rate);
        // Another address has its own bucket.
        kept.push(a.admit(ip(2), &limits, t0).unwrap());
        // One token every 100 ms.
        assert!(a.admit(ip(1), &limits, t0 + Duration::from_millis(50)).is_err());
        kept.push(a.admit(ip(1), &limits, t0 + Duration::from_millis(160)).unwrap());
        assert!(a.admit(ip(1), &limits, t0 + Duration::from_millis(170)).is_err());
    }

    #[test]
    fn the_address_table_is_swept_of_idle_entries() {
        let limits = ConnectionLimits {
            new_per_address_per_sec: 100,
            new_per_address_burst: 1,
            ..Default::default()
        };
        let a = Admission::new();
        let t0 = Instant::now();
        for i in 0..(SWEEP_EVERY - 1) {
            let peer = IpAddr::from([10, 1, (i >> 8) as u8, i as u8]);
            drop(a.admit(peer, &limits, t0).unwrap());
        }
        assert_eq!(a.addresses(), SWEEP_EVERY as usize - 1);
        // A second later every bucket is full again: the next sweep drops them all.
        drop(a.admit(ip(9), &limits, t0 + Duration::from_secs(1)).unwrap());
        assert!(a.addresses() <= 1, "{}", a.addresses());
        assert_eq!(a.open(), 0);
    }

    #[test]
    fn no_limits_keep_no_table() {
        let a = Admission::new();
        let limits = ConnectionLimits::default();
        let kept: Vec<_> =
            (0..100).map(|i| a.admit(ip(i), &limits, Instant::now()).unwrap()).collect();
        assert_eq!(a.addresses(), 0);
        assert_eq!(a.open(), 100);
        drop(kept);
        assert_eq!(a.open(), 0);
    }
}
