//! Settings that a configuration reload replaces while the process runs.
//!
//! A [`Live`] value is read where it is used (`get`, lock-free: a connection takes the limits
//! current when it opens, a request the routes current when it arrives) and replaced as a whole
//! by the reload (`set`). Whoever derives state from it (an index, a cache) waits on
//! [`Live::changed`] and rebuilds. Nothing here knows the configuration file: the binary's
//! reload decides which section goes where.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

/// A value shared by its readers and replaced by configuration reloads.
pub struct Live<T> {
    value: Arc<ArcSwap<T>>,
    version: Arc<watch::Sender<u64>>,
}

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Self { value: self.value.clone(), version: self.version.clone() }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Live").field(&*self.get()).finish()
    }
}

impl<T> Live<T> {
    /// Starts with `value`.
    pub fn new(value: T) -> Self {
        Self {
            value: Arc::new(ArcSwap::from_pointee(value)),
            version: Arc::new(watch::channel(0).0),
        }
    }

    /// The current value. Hold it for as long as one unit of work should see one value.
    pub fn get(&self) -> Arc<T> {
        self.value.load_full()
    }

    /// Replaces the value; readers see it from their next `get`, waiters on
    /// [`changed`](Self::changed) wake.
    pub fn set(&self, value: T) {
        self.value.store(Arc::new(value));
        self.version.send_modify(|v| *v += 1);
    }

    /// Wakes whoever waits on [`changed`](Self::changed) without replacing the value: the
    /// value did not change, but something it is used with did (a cache must be dropped).
    pub fn touch(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// A receiver that is marked changed on every `set` or `touch` from now on.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

impl<T: PartialEq> Live<T> {
    /// Replaces the value if `value` differs from it; says whether it did.
    pub fn set_if_changed(&self, value: T) -> bool {
        if *self.get() == value {
            return false;
        }
        self.set(value);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_see_the_new_value_and_waiters_wake() {
        let live = Live::new(1);
        let held = live.get();
        let mut changed = live.changed();
        assert!(!live.set_if_changed(1));
        assert!(!changed.has_changed().unwrap());
        assert!(live.clone().set_if_changed(2));
        changed.changed().await.unwrap();
        assert_eq!((*held, *live.get()), (1, 2), "a held value stays as it was");
        live.touch();
        assert!(changed.has_changed().unwrap());
    }
}
