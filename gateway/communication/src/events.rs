//! Connectivity and revocation: 9/ELCE `connected` when a session first uses an endpoint and
//! `disconnected` when it ends; a 16/ECAP token revocation ends every session of the endpoint,
//! a client credential revocation every session that authenticated with it.

use std::sync::Weak;

use fleetgate_bus::{Bus, Subscription, now_ms};
use fleetgate_messages::{
    ClientCredentialRevokedEvent, ConnectedEvent, DisconnectedEvent, EndpointTokenRevokedEvent,
    Record,
};
use fleetgate_transport_core::SessionId;
use tokio::sync::watch;

use crate::Gateway;

impl<B: Bus> Gateway<B> {
    /// Announces `endpoints` (endpoint id, app version) connected.
    pub(crate) async fn publish_connected(&self, endpoints: &[(&str, &str)]) {
        let subject = &self.connected_subject;
        let (_, correlation_id) = self.new_correlation_id();
        let event = ConnectedEvent {
            correlation_id: correlation_id.as_str(),
            timestamp_ms: now_ms(),
            timeout_ms: 0,
            endpoints: endpoints.to_vec(),
            originator_replica_id: &self.replica_id,
        };
        if let Err(e) = self.bus.publish(subject.clone(), None, event.to_bytes()).await {
            tracing::warn!(error = %e, subject = %subject, "cannot publish a connectivity event");
        }
    }

    /// Ends a session (the transport closes the connection when its outbox goes) and
    /// announces its endpoints disconnected. Idempotent.
    pub(crate) fn end_session(&self, session: SessionId) {
        let Some(endpoints) = self.sessions.close(session) else {
            return;
        };
        self.metrics.sessions_open.dec();
        if endpoints.is_empty() {
            return;
        }
        // Called from synchronous code (a connection's teardown): publish in the background.
        let bus = self.bus.clone();
        let subject = self.disconnected_subject.clone();
        let correlation_id = self.new_correlation_id().1.as_str().to_owned();
        let replica_id = self.replica_id.clone();
        tokio::spawn(async move {
            let pairs: Vec<(&str, &str)> =
                endpoints.iter().map(|(e, a)| (e.as_ref(), a.as_ref())).collect();
            let event = DisconnectedEvent {
                correlation_id: &correlation_id,
                timestamp_ms: now_ms(),
                timeout_ms: 0,
                endpoints: pairs,
                originator_replica_id: &replica_id,
            };
            if let Err(e) = bus.publish(subject, None, event.to_bytes()).await {
                tracing::warn!(error = %e, "cannot publish a disconnected event");
            }
        });
    }
}

/// Ends the sessions of every endpoint whose token is revoked, until shutdown.
pub(crate) async fn end_revoked<B: Bus>(
    gateway: Weak<Gateway<B>>,
    mut events: Subscription,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let msg = tokio::select! {
            m = events.next() => match m { Some(m) => m, None => break },
            _ = fleetgate_bus::stopped(&mut shutdown) => break,
        };
        let Some(gateway) = gateway.upgrade() else {
            break;
        };
        match EndpointTokenRevokedEvent::decode(&msg.payload) {
            Ok(event) => {
                // 16/ECAP names the application; a provider that keys tokens by app version
                // (fleetgate's own) names that, so either matches.
                let app = event.app_name;
                let in_app = |version: &str| {
                    version == app || gateway.app_names.get(version).is_some_and(|a| a == app)
                };
                let (endpoint_id, token_ids) = (event.endpoint_id, &event.token_ids);
                gateway.tokens.evict_revoked(endpoint_id, &in_app, token_ids);
                for session in gateway.sessions.revoked(endpoint_id, &in_app, token_ids) {
                    tracing::info!(
                        session = session.0,
                        endpoint_id,
                        "token revoked: session ended"
                    );
                    gateway.metrics.sessions_revoked.inc();
                    gateway.end_session(session);
                }
            }
            Err(e) => tracing::warn!(error = %e, "undecodable token revocation dropped"),
        }
    }
}

/// Ends the sessions of every client whose credential is revoked (16/ECAP
/// `ClientCredentialRevokedEvent`), until shutdown.
pub(crate) async fn end_revoked_credentials<B: Bus>(
    gateway: Weak<Gateway<B>>,
    mut events: Subscription,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let msg = tokio::select! {
            m = events.next() => match m { Some(m) => m, None => break },
            _ = fleetgate_bus::stopped(&mut shutdown) => break,
        };
        let Some(gateway) = gateway.upgrade() else {
            break;
        };
        match ClientCredentialRevokedEvent::decode(&msg.payload) {
            Ok(event) => {
                for session in gateway.sessions.sessions_with_credential(event.credential_id) {
                    tracing::info!(
                        session = session.0,
                        credential_id = event.credential_id,
                        "client credential revoked: session ended"
                    );
                    gateway.metrics.sessions_revoked.inc();
                    gateway.end_session(session);
                }
            }
            Err(e) => tracing::warn!(error = %e, "undecodable credential revocation dropped"),
        }
    }
}

/// Keeps the gateway's view of the authentication provider up to date for `/readyz`: when no
/// device asked it anything for a while, or it did not answer last time, a probe asks.
pub(crate) async fn probe_auth<B: Bus>(
    gateway: Weak<Gateway<B>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = fleetgate_bus::stopped(&mut shutdown) => return,
        }
        let Some(gateway) = gateway.upgrade() else { return };
        gateway.tokens.probe(std::time::Duration::from_secs(5)).await;
    }
}
