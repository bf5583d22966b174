//! Bus → device: extension answers and pushes to the sessions that should get them.
//!
//! `ExtensionData` on this replica's reply subject answers a pending request (its correlation
//! id carries the request number); anything else (a push, or an error for a request without
//! id) goes to every session that uses the endpoint. Sessions that subscribed to a filter
//! naming the endpoint's token get a copy. A request whose extension does not answer in time
//! gets 504. Answers are queued in each session's bounded outbox; a session that lets its
//! outbox fill is closed.

use std::sync::Weak;
use std::time::Duration;

use bytes::Bytes;
use fleetgate_bus::{Bus, Subscription};
use fleetgate_messages::{ExtensionData, Record};
use fleetgate_transport_core::{
    KpError, KpOutcome, KpResponse, SessionId, response_topic, status_reason, topic_filter_matches,
};
use futures_util::future::join_all;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Gateway;
use crate::correlation::request_number;
use crate::pending::State;
use crate::sessions::Delivery;

/// Routes every `ExtensionData` of `answers` until shutdown.
pub(crate) async fn route_answers<B: Bus>(
    gateway: Weak<Gateway<B>>,
    mut answers: Subscription,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let msg = tokio::select! {
            m = answers.next() => match m { Some(m) => m, None => break },
            _ = fleetgate_bus::stopped(&mut shutdown) => break,
        };
        let Some(gateway) = gateway.upgrade() else {
            break;
        };
        gateway.on_extension_data(&msg.payload);
    }
}

/// Settles requests whose extension did not answer in time (spooled, or 504 without a spool;
/// replays go back to the spool), and samples the gauges for `/metrics`.
pub(crate) async fn expire_requests<B: Bus>(
    gateway: Weak<Gateway<B>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = fleetgate_bus::stopped(&mut shutdown) => break,
        }
        let Some(gateway) = gateway.upgrade() else {
            break;
        };
        let now = Instant::now();
        let mut late = Vec::new();
        for (n, pending) in gateway.pending.expire(now) {
            match pending.state {
                State::Direct { .. } if gateway.delivery.spool.is_some() => {
                    gateway.metrics.spool_delivery_timeouts.inc();
                    late.push((n, pending));
                }
                State::Direct { .. } => {
                    gateway.metrics.timeouts.inc();
                    pending.latency.observe(now.duration_since(pending.sent));
                    let Some(route) = pending.route else { continue };
                    let reason = format!(
                        "the extension did not answer within {} ms",
                        gateway.config.request_timeout_ms
                    );
                    let response = KpResponse {
                        base: route.base,
                        request_id: route.request_id,
                        tag: route.tag,
                        outcome: KpOutcome::Error(KpError::timeout(reason)),
                    };
                    gateway.copy_to_subscribers(&response, &[route.session]);
                    gateway.deliver_answer(route.session, response);
                }
                State::Replay { seq } => gateway.replay_failed(seq),
            }
        }
        if !late.is_empty() {
            // Spooling waits for the disk: not in this loop. All at once, so that they share
            // one sync of the spool (one after the other, a sync each, acknowledgements came
            // at a few hundred per second under load); each is numbered, in order, when first
            // polled.
            let g = gateway.clone();
            tokio::spawn(async move {
                join_all(late.into_iter().map(|(n, pending)| g.spool_late(n, pending))).await;
            });
        }
        gateway.sample_gauges();
    }
}

impl<B: Bus> Gateway<B> {
    /// Routes one `ExtensionData`: to the session that sent the request it answers, else (a
    /// push, or an error for a request without id) to every session that uses the endpoint.
    pub(crate) fn on_extension_data(&self, payload: &Bytes) {
        let answer = match ExtensionData::decode(payload) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable ExtensionData dropped");
                return;
            }
        };
        let outcome = if (200..300).contains(&answer.status_code) {
            KpOutcome::Success(answer.payload.map_or_else(Bytes::new, |p| payload.slice_ref(p)))
        } else {
            let status = u16::try_from(answer.status_code).unwrap_or(500);
            let reason = answer.reason_phrase.unwrap_or_else(|| status_reason(status));
            KpOutcome::Error(KpError::new(status, reason.to_owned()))
        };
        if let Some(pending) = request_number(&self.correlation_prefix, answer.correlation_id)
            .and_then(|n| self.pending.take(n))
        {
            pending.latency.observe(pending.sent.elapsed());
            match pending.state {
                State::Direct { .. } => {
                    let Some(route) = pending.route else { return };
                    let response = KpResponse {
                        base: route.base,
                        request_id: route.request_id,
                        tag: route.tag,
                        outcome,
                    };
                    self.metrics.responses.inc();
                    self.copy_to_subscribers(&response, &[route.session]);
                    self.deliver_answer(route.session, response);
                }
                State::Replay { seq } => {
                    self.metrics.responses.inc();
                    self.settle_record(seq, outcome);
                }
            }
            return;
        }
        let (Some(endpoint_id), Some(extension)) =
            (answer.endpoint_id, answer.extension_instance_name)
        else {
            tracing::debug!(
                correlation_id = answer.correlation_id,
                "answer for no pending request and no endpoint dropped"
            );
            return;
        };
        let request_id =
            answer.request_id.and_then(|id| u32::try_from(id).ok()).filter(|id| *id > 0);
        let routes = self.sessions.routes_of(endpoint_id, answer.app_version_name);
        if routes.is_empty() {
            self.metrics.undeliverable.inc();
            tracing::debug!(endpoint_id, "push for an endpoint with no session here dropped");
        }
        let delivered: Vec<SessionId> = routes.iter().map(|r| r.session).collect();
        let mut copied_for = Vec::new();
        for route in routes {
            let base = format!(
                "kp1/{}/{extension}/{}{}",
                route.app_version, route.token, answer.resource_path
            );
            let response = KpResponse {
                base: Bytes::from(base),
                request_id,
                tag: 0,
                outcome: outcome.clone(),
            };
            if !copied_for.contains(&route.token) {
                self.copy_to_subscribers(&response, &delivered);
                copied_for.push(route.token.clone());
            }
            self.metrics.pushes.inc();
            self.deliver(route.session, response);
        }
    }

    /// Copies `response` to the sessions whose subscriptions match its topic, except those in
    /// `delivered` (which have it already).
    pub(crate) fn copy_to_subscribers(&self, response: &KpResponse, delivered: &[SessionId]) {
        let Some(token) = token_of(&response.base) else {
            return;
        };
        let subscribers = self.sessions.subscribers_of(token);
        if subscribers.is_empty() {
            return;
        }
        let topic = response_topic(response);
        for s in subscribers {
            if !delivered.contains(&s.session) && topic_filter_matches(&s.filter, &topic) {
                self.metrics.copies.inc();
                self.deliver(s.session, KpResponse { tag: s.tag, ..response.clone() });
            }
        }
    }

    /// Queues the late answer to a spooled request, if the session still reads; unlike a push
    /// it never closes the session (the device did not ask for it to come this late).
    pub(crate) fn deliver_late(&self, session: SessionId, response: KpResponse) {
        self.copy_to_subscribers(&response, &[session]);
        if !matches!(self.sessions.deliver(session, response), Delivery::Queued) {
            self.metrics.undeliverable.inc();
        }
    }

    /// Queues the answer to one of the session's requests in the room reserved for it.
    pub(crate) fn deliver_answer(&self, session: SessionId, response: KpResponse) {
        if let Delivery::NoSession = self.sessions.deliver_reserved(session, response) {
            self.metrics.undeliverable.inc();
        }
    }

    /// Queues `response` (a push or a copy) in the session's outbox without waiting; a session
    /// whose outbox is full does not read its responses and is closed.
    fn deliver(&self, session: SessionId, response: KpResponse) {
        match self.sessions.deliver(session, response) {
            Delivery::Queued => {}
            Delivery::NoSession => {
                self.metrics.undeliverable.inc();
            }
            Delivery::TooSlow => {
                self.metrics.slow_sessions.inc();
                tracing::warn!(
                    session = session.0,
                    "session closed: it does not read its responses"
                );
                self.end_session(session);
            }
        }
    }
}

/// The endpoint token of a 1/KP path (`kp1/<app version>/<extension>/<token>/...`).
fn token_of(base: &[u8]) -> Option<&str> {
    let base = std::str::from_utf8(base).ok()?;
    base.split('/').nth(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_of_paths() {
        assert_eq!(token_of(b"kp1/a/dcx/t/json"), Some("t"));
        assert_eq!(token_of(b"kp1/a/dcx"), None);
    }
}
