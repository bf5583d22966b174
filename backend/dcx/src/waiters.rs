//! Batches waiting for their reliable 13/DSTP receivers.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::oneshot;

/// The pending batches of one DCX replica, by event correlation id.
#[derive(Default)]
pub(crate) struct Waiters {
    pending: Mutex<HashMap<String, Waiter>>,
}

struct Waiter {
    /// Receivers that have not confirmed yet.
    outstanding: Vec<String>,
    done: oneshot::Sender<super::Outcome>,
}

impl Waiters {
    /// Starts waiting for every receiver in `receivers` to confirm the event `correlation_id`.
    /// The returned channel yields 200 once all confirmed with 2xx, or the first failure.
    pub(crate) fn register(
        &self,
        correlation_id: &str,
        receivers: &[String],
    ) -> oneshot::Receiver<super::Outcome> {
        let (done, rx) = oneshot::channel();
        let waiter = Waiter { outstanding: receivers.to_vec(), done };
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(correlation_id.to_owned(), waiter);
        }
        rx
    }

    /// Records a receiver's `DataSamplesProcessed`.
    pub(crate) fn confirm(
        &self,
        correlation_id: &str,
        receiver: &str,
        status: i32,
        reason: Option<&str>,
    ) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        let Some(waiter) = pending.get_mut(correlation_id) else {
            tracing::debug!(correlation_id, receiver, "confirmation for no pending batch");
            return;
        };
        let Some(i) = waiter.outstanding.iter().position(|r| r == receiver) else {
            return; // not a reliable receiver, or a duplicate answer
        };
        waiter.outstanding.swap_remove(i);
        let failed = !(200..300).contains(&status);
        if failed || waiter.outstanding.is_empty() {
            let Some(waiter) = pending.remove(correlation_id) else {
                return;
            };
            let outcome = if failed {
                let why = reason.map_or_else(
                    || format!("data receiver `{receiver}` failed with {status}"),
                    |r| format!("data receiver `{receiver}` failed: {r}"),
                );
                (status, Some(why))
            } else {
                (200, None)
            };
            let _ = waiter.done.send(outcome);
        }
    }

    /// Stops waiting (timeout or publish failure).
    pub(crate) fn forget(&self, correlation_id: &str) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(correlation_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_every_named_receiver() {
        let w = Waiters::default();
        let rx = w.register("c1", &["epts".into(), "archive".into()]);
        w.confirm("c1", "epts", 200, None);
        w.confirm("c1", "someone-else", 500, None);
        w.confirm("c1", "epts", 200, None);
        w.confirm("c1", "archive", 200, None);
        assert_eq!(rx.await.expect("outcome"), (200, None));
    }

    #[tokio::test]
    async fn first_failure_wins() {
        let w = Waiters::default();
        let rx = w.register("c1", &["epts".into(), "archive".into()]);
        w.confirm("c1", "archive", 507, Some("disk full"));
        let (status, reason) = rx.await.expect("outcome");
        assert_eq!(status, 507);
        assert!(reason.unwrap_or_default().contains("disk full"));
    }
}
