//! Failed authentications per source address, with back-off: after `max_failures` failures
//! within `window_ms`, an address gets no provider lookups (new tokens, session opens) for
//! `backoff_ms`; what it already proved (a session's validated tokens, the positive cache)
//! keeps working. The table is bounded: when it is full, addresses whose window has passed
//! are swept, and if none has, the new address is not tracked (it is still refused nothing).

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::sharded::Sharded;

/// `gateway.auth_failures`: back-off for addresses that keep failing to authenticate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthFailuresConfig {
    /// Failures within the window that start a back-off (0: no back-off).
    pub max_failures: u32,
    /// The window failures are counted in.
    pub window_ms: u64,
    /// How long an address gets no lookups once it is over the limit.
    pub backoff_ms: u64,
    /// Addresses tracked at most (bounded memory under a flood of spoofed sources).
    pub max_addresses: usize,
}

impl Default for AuthFailuresConfig {
    fn default() -> Self {
        Self { max_failures: 50, window_ms: 10_000, backoff_ms: 10_000, max_addresses: 65_536 }
    }
}

struct Failures {
    since: Instant,
    count: u32,
    blocked_until: Option<Instant>,
}

pub(crate) struct AuthGuard {
    config: AuthFailuresConfig,
    table: Sharded<IpAddr, Failures>,
    per_shard: usize,
}

impl AuthGuard {
    pub(crate) fn new(config: &AuthFailuresConfig) -> Self {
        let per_shard = config.max_addresses.div_ceil(crate::sharded::SHARDS).max(1);
        Self { config: config.clone(), table: Sharded::default(), per_shard }
    }

    /// Whether `peer` is backing off now.
    pub(crate) fn blocked(&self, peer: IpAddr, now: Instant) -> bool {
        if self.config.max_failures == 0 {
            return false;
        }
        let shard = self.table.shard(&peer);
        shard.get(&peer).and_then(|f| f.blocked_until).is_some_and(|until| until > now)
    }

    /// Counts a failed authentication from `peer`; true when it starts a back-off.
    pub(crate) fn failed(&self, peer: IpAddr, now: Instant) -> bool {
        if self.config.max_failures == 0 {
            return false;
        }
        let window = Duration::from_millis(self.config.window_ms);
        let mut shard = self.table.shard(&peer);
        if !shard.contains_key(&peer) && shard.len() >= self.per_shard {
            let backoff = Duration::from_millis(self.config.backoff_ms);
            shard.retain(|_, f| f.since + window.max(backoff) > now);
            if shard.len() >= self.per_shard {
                return false;
            }
        }
        let f = shard.entry(peer).or_insert(Failures { since: now, count: 0, blocked_until: None });
        if f.since + window <= now {
            *f = Failures { since: now, count: 0, blocked_until: f.blocked_until };
        }
        f.count = f.count.saturating_add(1);
        if f.count >= self.config.max_failures && f.blocked_until.is_none_or(|u| u <= now) {
            f.blocked_until = Some(now + Duration::from_millis(self.config.backoff_ms));
            f.count = 0;
            f.since = now;
            return true;
        }
        false
    }

    /// Addresses tracked now (for tests).
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        let mut n = 0;
        self.table.for_each_shard(|m| n += m.len());
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[tokio::test(start_paused = true)]
    async fn backs_off_after_the_limit_and_forgives_after_it() {
        let config = AuthFailuresConfig {
            max_failures: 3,
            window_ms: 1_000,
            backoff_ms: 5_000,
            max_addresses: 1_000,
        };
        let guard = AuthGuard::new(&config);
        let t0 = Instant::now();
        assert!(!guard.failed(ip(1), t0));
        assert!(!guard.failed(ip(1), t0));
        assert!(!guard.blocked(ip(1), t0));
        assert!(guard.failed(ip(1), t0), "the third failure starts the back-off");
        assert!(guard.blocked(ip(1), t0 + Duration::from_millis(4_999)));
        assert!(!guard.blocked(ip(2), t0), "other addresses are not affected");
        assert!(!guard.blocked(ip(1), t0 + Duration::from_millis(5_000)));
        // Failures spread wider than the window never add up.
        for i in 0..10 {
            assert!(!guard.failed(ip(3), t0 + Duration::from_millis(600 * i)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded() {
        let config = AuthFailuresConfig { max_addresses: 64, ..AuthFailuresConfig::default() };
        let guard = AuthGuard::new(&config);
        let now = Instant::now();
        for n in 0..100_000 {
            guard.failed(ip(n), now);
        }
        assert!(guard.tracked() <= 64 + crate::sharded::SHARDS, "{}", guard.tracked());
        // Once the windows have passed, new addresses are tracked again.
        let later = now + Duration::from_secs(60);
        for n in 0..50 {
            guard.failed(ip(1_000_000 + n), later);
        }
        assert!(guard.tracked() >= 40, "{}", guard.tracked());
    }
}
