//! What CMX remembers of endpoints, bounded.
//!
//! Per endpoint: its app version, where its gateway replica listens, how many sessions have it
//! connected (9/ELCE `connected` adds one, `disconnected` takes one; an endpoint a request
//! came from counts as connected until a disconnect), and per configuration name what the
//! device confirmed and its observe choice.
//! The connected endpoints are the targets of an app version's changed default. An endpoint
//! whose last session disconnected leaves that set; its entry is dropped unless it holds a
//! confirmation or an observe choice, which stays as memory (so a reconnect does not re-push a
//! confirmed configuration).
//!
//! At most `max` entries: past it the least recently used one is evicted (counted, and
//! logged the first time). Forgetting costs at most one push more than needed on the
//! endpoint's next connect (re-applying a configuration is harmless) or, for an evicted
//! connected endpoint, the push of a changed default until its next request.

use std::collections::{HashMap, VecDeque};

/// What CMX remembers of one configuration (name) of one endpoint.
#[derive(Debug, Default)]
pub(crate) struct NameState {
    /// What the device said last; `Some(false)`: no pushes.
    pub(crate) observe: Option<bool>,
    /// The configuration id the device last confirmed.
    pub(crate) confirmed: Option<String>,
}

/// What CMX remembers of one endpoint.
#[derive(Debug, Default)]
pub(crate) struct EndpointState {
    pub(crate) app_version: String,
    /// Where the gateway replica that serves it listens.
    pub(crate) reply: Option<fleetgate_bus::Subject>,
    pub(crate) names: HashMap<String, NameState>,
    /// Sessions that have it connected, as far as this replica heard.
    pub(crate) connections: u32,
    /// When it was last used (a tick of [`Endpoints`]), for eviction.
    used: u64,
}

impl EndpointState {
    fn is_worth_keeping(&self) -> bool {
        self.names.values().any(|n| n.observe.is_some() || n.confirmed.is_some())
    }
}

/// The bounded endpoint table.
#[derive(Debug)]
pub(crate) struct Endpoints {
    map: HashMap<String, EndpointState>,
    /// (endpoint, tick) for every use, oldest first; stale entries (the endpoint was used again
    /// later, or is gone) are skipped, and compacted away when they pile up.
    uses: VecDeque<(String, u64)>,
    tick: u64,
    max: usize,
    /// Entries evicted because the table was full.
    pub(crate) evicted: u64,
}

impl Endpoints {
    pub(crate) fn new(max: usize) -> Self {
        Self { map: HashMap::new(), uses: VecDeque::new(), tick: 0, max: max.max(1), evicted: 0 }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// The entry of `endpoint`, made if new (evicting the least recently used one when the
    /// table is full), and marked used.
    pub(crate) fn entry(&mut self, endpoint: &str) -> &mut EndpointState {
        if !self.map.contains_key(endpoint) {
            while self.map.len() >= self.max && self.evict_one() {}
        }
        if self.uses.len() > 2 * self.max + 64 {
            let map = &self.map;
            self.uses.retain(|(e, t)| map.get(e).is_some_and(|s| s.used == *t));
        }
        self.tick += 1;
        self.uses.push_back((endpoint.to_owned(), self.tick));
        let state = self.map.entry(endpoint.to_owned()).or_default();
        state.used = self.tick;
        state
    }

    /// Removes the least recently used entry; false if there was none.
    fn evict_one(&mut self) -> bool {
        while let Some((endpoint, tick)) = self.uses.pop_front() {
            if self.map.get(&endpoint).is_some_and(|s| s.used == tick) {
                self.map.remove(&endpoint);
                self.evicted += 1;
                return true;
            }
        }
        false
    }

    /// 9/ELCE connected (or a request): one more session has it.
    pub(crate) fn connected(&mut self, endpoint: &str, app_version: &str) -> &mut EndpointState {
        let state = self.entry(endpoint);
        app_version.clone_into(&mut state.app_version);
        state.connections = state.connections.saturating_add(1);
        state
    }

    /// 9/ELCE disconnected: one session less; at none it leaves the connected set, and is
    /// forgotten unless it holds something worth remembering.
    pub(crate) fn disconnected(&mut self, endpoint: &str) {
        let Some(state) = self.map.get_mut(endpoint) else { return };
        state.connections = state.connections.saturating_sub(1);
        if state.connections == 0 {
            state.reply = None;
            if !state.is_worth_keeping() {
                self.map.remove(endpoint);
            }
        }
    }

    /// The connected endpoints of `app_version`.
    pub(crate) fn connected_of(&self, app_version: &str) -> Vec<String> {
        self.map
            .iter()
            .filter(|(_, s)| {
                (s.connections > 0 || s.reply.is_some()) && s.app_version == app_version
            })
            .map(|(e, _)| e.clone())
            .collect()
    }

    pub(crate) fn get(&self, endpoint: &str) -> Option<&EndpointState> {
        self.map.get(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disconnect_removes_the_endpoint_from_the_connected_set() {
        let mut t = Endpoints::new(10);
        t.connected("a", "v1");
        t.connected("b", "v1");
        t.connected("b", "v1");
        t.disconnected("a");
        assert_eq!(t.connected_of("v1"), ["b"]);
        assert!(t.get("a").is_none(), "nothing worth keeping: forgotten");
        // Two sessions had b: still connected after one goes.
        t.disconnected("b");
        assert_eq!(t.connected_of("v1"), ["b"]);
        t.disconnected("b");
        assert!(t.connected_of("v1").is_empty());
        assert_eq!(t.len(), 0);
        // A disconnect of an unknown endpoint, or one too many, changes nothing.
        t.disconnected("zz");
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_confirmation_outlives_the_disconnect() {
        let mut t = Endpoints::new(10);
        let s = t.connected("a", "v1");
        s.names.entry("default".into()).or_default().confirmed = Some("c1".into());
        t.disconnected("a");
        assert!(t.connected_of("v1").is_empty());
        let s = t.get("a").expect("kept");
        assert_eq!(s.names["default"].confirmed.as_deref(), Some("c1"));
        assert!(s.reply.is_none());
    }

    #[test]
    fn a_flood_of_connects_stays_within_the_bound_evicting_the_least_recently_used() {
        let mut t = Endpoints::new(100);
        for i in 0..10_000 {
            t.connected(&format!("ep-{i}"), "v1");
            // ep-0 keeps being used: never the least recently used one.
            t.entry("ep-0");
            assert!(t.len() <= 100);
        }
        assert_eq!(t.len(), 100);
        assert_eq!(t.evicted, 10_000 - 100);
        assert!(t.get("ep-0").is_some());
        assert!(t.get("ep-9999").is_some());
        assert!(t.get("ep-1").is_none());
        // The use log is compacted, not grown per use.
        assert!(t.uses.len() <= 2 * 100 + 64 + 1, "{}", t.uses.len());
    }
}
