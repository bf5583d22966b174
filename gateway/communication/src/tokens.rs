//! Endpoint token → endpoint id, through 16/ECAP with a cache.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use fleetgate_bus::{Bus, BusError, Requester, Subject, now_ms};
use fleetgate_messages::{EndpointTokenValidationRequest, EndpointTokenValidationResponse, Record};
use fleetgate_transport_core::KpError;
use fleetgate_transport_core::metrics::Counter;
use tokio::time::Instant;

use crate::GatewayConfig;
use crate::sharded::Sharded;

struct Cached {
    app_version: Box<str>,
    endpoint: Result<Arc<str>, KpError>,
    expires: Instant,
}

/// A validated token's endpoint, and until when the validation may be trusted.
pub(crate) struct Resolved {
    pub(crate) endpoint_id: Arc<str>,
    pub(crate) expires: Instant,
}

/// Validated tokens, keyed by token, per app version (fleetgate sends the app version name as
/// the 16/ECAP `appName`).
pub(crate) struct TokenCache<B: Bus> {
    requester: Requester<B>,
    subject: Subject,
    cache: Sharded<Box<str>, Vec<Cached>>,
    timeout: Duration,
    ttl: Duration,
    negative_ttl: Duration,
    next_request: AtomicU64,
    /// Whether the 16/ECAP provider answered the last request (a validation or a probe).
    answering: AtomicBool,
    /// When it last answered, ms since the epoch.
    last_answer_ms: AtomicI64,
}

impl<B: Bus> TokenCache<B> {
    pub(crate) fn new(requester: Requester<B>, subject: Subject, config: &GatewayConfig) -> Self {
        Self {
            requester,
            subject,
            cache: Sharded::default(),
            timeout: Duration::from_millis(config.auth_timeout_ms),
            ttl: Duration::from_millis(config.token_cache_ttl_ms),
            negative_ttl: Duration::from_millis(config.token_negative_cache_ttl_ms),
            next_request: AtomicU64::new(1),
            answering: AtomicBool::new(true),
            last_answer_ms: AtomicI64::new(now_ms()),
        }
    }

    /// Forgets every validation: the next use of each token asks the provider.
    pub(crate) fn forget_all(&self) {
        self.cache.for_each_shard(HashMap::clear);
    }

    fn cached(&self, app_version: &str, token: &str) -> Option<Result<Resolved, KpError>> {
        let shard = self.cache.shard(token);
        let entry = shard.get(token)?.iter().find(|c| &*c.app_version == app_version)?;
        (entry.expires > Instant::now()).then(|| {
            let endpoint_id = entry.endpoint.clone()?;
            Ok(Resolved { endpoint_id, expires: entry.expires })
        })
    }

    /// The endpoint id of `token` in `app_version` and until when it may be trusted: 401 when
    /// the provider does not know it, 503 when the provider does not answer.
    pub(crate) async fn resolve(
        &self,
        app_version: &str,
        token: &str,
        misses: &Counter,
    ) -> Result<Resolved, KpError> {
        if let Some(hit) = self.cached(app_version, token) {
            return hit;
        }
        misses.inc();
        // Replies come to this replica's own subject, so a counter is unique enough.
        let correlation_id = format!("token-{}", self.next_request.fetch_add(1, Ordering::Relaxed));
        let request = EndpointTokenValidationRequest {
            correlation_id: &correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: i64::try_from(self.timeout.as_millis()).unwrap_or(0),
            app_name: app_version,
            token,
        };
        let reply = self
            .requester
            .request(self.subject.clone(), &correlation_id, request.to_bytes(), self.timeout)
            .await;
        self.heard(reply.is_ok());
        let reply = reply.map_err(|e| match e {
            BusError::NoResponders(_) => {
                KpError::unavailable("no authentication service is running")
            }
            _ => KpError::unavailable("the authentication service did not answer"),
        })?;
        let answer = EndpointTokenValidationResponse::decode(&reply.payload).map_err(|e| {
            tracing::warn!(error = %e, "undecodable ep-token-response");
            KpError::unavailable("the authentication service gave an unreadable answer")
        })?;
        let endpoint = match (answer.status_code, answer.endpoint_id) {
            (200..=299, Some(id)) => Ok(Arc::<str>::from(id)),
            (200..=299 | 401 | 404, _) => Err(KpError::unauthorized("unknown endpoint token")),
            (403, _) => Err(KpError::forbidden(
                answer.reason_phrase.unwrap_or("token not permitted").to_owned(),
            )),
            (status, _) => {
                tracing::warn!(status, "token validation failed");
                return Err(KpError::unavailable("the authentication service failed"));
            }
        };
        let ttl = if endpoint.is_ok() { self.ttl } else { self.negative_ttl };
        let expires = Instant::now() + ttl;
        let entry = Cached { app_version: app_version.into(), endpoint: endpoint.clone(), expires };
        let mut shard = self.cache.shard(token);
        let entries = shard.entry(token.into()).or_default();
        entries.retain(|c| &*c.app_version != app_version);
        entries.push(entry);
        endpoint.map(|endpoint_id| Resolved { endpoint_id, expires })
    }

    /// Whether the provider answers: it answered the last request, or the last probe.
    pub(crate) fn provider_answers(&self) -> bool {
        self.answering.load(Ordering::Relaxed)
    }

    fn heard(&self, answered: bool) {
        self.answering.store(answered, Ordering::Relaxed);
        if answered {
            self.last_answer_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// Asks the provider about a token no device uses, unless it answered a real request in the
    /// last `quiet`: any answer (401 included) shows that it is there.
    pub(crate) async fn probe(&self, quiet: Duration) {
        let quiet_ms = i64::try_from(quiet.as_millis()).unwrap_or(i64::MAX);
        if self.provider_answers()
            && now_ms().saturating_sub(self.last_answer_ms.load(Ordering::Relaxed)) < quiet_ms
        {
            return;
        }
        let correlation_id = format!("probe-{}", self.next_request.fetch_add(1, Ordering::Relaxed));
        let request = EndpointTokenValidationRequest {
            correlation_id: &correlation_id,
            timestamp_ms: now_ms(),
            timeout_ms: i64::try_from(self.timeout.as_millis()).unwrap_or(0),
            app_name: "fleetgate-readiness-probe",
            token: "-",
        };
        let reply = self
            .requester
            .request(self.subject.clone(), &correlation_id, request.to_bytes(), self.timeout)
            .await;
        let answered = reply.is_ok();
        if answered != self.provider_answers() {
            match answered {
                true => tracing::info!("the authentication provider answers again"),
                false => tracing::warn!("the authentication provider does not answer"),
            }
        }
        self.heard(answered);
    }

    /// Forgets every cached token of `endpoint_id` in `app_version` (16/ECAP revocation).
    pub(crate) fn evict_endpoint(&self, app_version: &str, endpoint_id: &str) {
        self.cache.for_each_shard(|map| {
            map.retain(|_, entries| {
                entries.retain(|c| {
                    !(&*c.app_version == app_version
                        && c.endpoint.as_ref().is_ok_and(|e| e.as_ref() == endpoint_id))
                });
                !entries.is_empty()
            });
        });
    }
}
