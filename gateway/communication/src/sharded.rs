//! A hash map split into independently locked shards, so that sessions and requests on
//! different cores rarely wait for one another (DESIGN: shard, don't funnel).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Mutex, MutexGuard};

pub(crate) const SHARDS: usize = 32;

/// A map of `K` to `V` in [`SHARDS`] mutex-protected shards.
pub(crate) struct Sharded<K, V> {
    shards: Box<[Mutex<HashMap<K, V>>]>,
    hasher: RandomState,
}

impl<K: Hash + Eq, V> Default for Sharded<K, V> {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl<K: Hash + Eq, V> Sharded<K, V> {
    /// The locked shard that holds `key`. A poisoned shard (a panic while it was held) is still
    /// usable: every update here leaves the map consistent.
    pub(crate) fn shard<Q>(&self, key: &Q) -> MutexGuard<'_, HashMap<K, V>>
    where
        K: Borrow<Q>,
        Q: Hash + ?Sized,
    {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every shard in turn, for sweeps and counts.
    pub(crate) fn for_each_shard(&self, mut f: impl FnMut(&mut HashMap<K, V>)) {
        for shard in self.shards.iter() {
            f(&mut shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        }
    }
}
