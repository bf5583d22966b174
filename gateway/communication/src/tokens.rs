//! Endpoint token → endpoint id, through 16/ECAP with two caches: the positive one (tokens
//! the provider validated, one entry per real endpoint token) and a separate negative one for
//! unknown and refused tokens, bounded in entries and TTL, so that a peer inventing tokens
//! cannot grow it. Tokens longer than `gateway.max_token_bytes` are refused before either.

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
    endpoint_id: Arc<str>,
    /// The provider's id for the token (what a revocation lists), when it gave one.
    token_id: Option<Arc<str>>,
    expires: Instant,
}

/// An unknown or refused token: the refusal, until when it stands.
#[derive(Clone)]
struct Refused {
    error: KpError,
    expires: Instant,
}

/// A validated token's endpoint, and until when the validation may be trusted.
pub(crate) struct Resolved {
    pub(crate) endpoint_id: Arc<str>,
    pub(crate) token_id: Option<Arc<str>>,
    pub(crate) expires: Instant,
}

/// Where a token's answer came from, when it was a refusal: the `reason` of
/// `fleetgate_gateway_auth_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Longer than `gateway.max_token_bytes`: refused without a lookup.
    TokenTooLong,
    /// The provider does not know it (now, or within the negative TTL).
    UnknownToken,
    /// The provider refused it for this client (403).
    TokenForbidden,
    /// The negative cache answered.
    NegativeCache,
    /// The source address is backing off after too many failures.
    Backoff,
    /// The provider did not answer, or answered with an error.
    ProviderUnavailable,
}

impl Refusal {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::TokenTooLong => "token_too_long",
            Self::UnknownToken => "unknown_token",
            Self::TokenForbidden => "token_forbidden",
            Self::NegativeCache => "negative_cache",
            Self::Backoff => "backoff",
            Self::ProviderUnavailable => "provider_unavailable",
        }
    }
}

/// The negative cache's key: app version and token (an app version has no `/`).
fn negative_key(app_version: &str, token: &str) -> String {
    let mut key = String::with_capacity(app_version.len() + 1 + token.len());
    key.push_str(app_version);
    key.push('/');
    key.push_str(token);
    key
}

/// Validated tokens, keyed by token, per app version (fleetgate sends the app version name as
/// the 16/ECAP `appName`).
pub(crate) struct TokenCache<B: Bus> {
    requester: Requester<B>,
    subject: Subject,
    cache: Sharded<Box<str>, Vec<Cached>>,
    /// Bounded (quick_cache: CLOCK-PRO eviction, an LRU approximation that a scan of
    /// one-off keys cannot flush).
    negative: quick_cache::sync::Cache<String, Refused>,
    max_token_bytes: usize,
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
            negative: quick_cache::sync::Cache::new(config.token_negative_cache_capacity.max(1)),
            max_token_bytes: config.max_token_bytes,
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
        self.negative.clear();
    }

    fn cached(&self, app_version: &str, token: &str, now: Instant) -> Option<Resolved> {
        let shard = self.cache.shard(token);
        let entry = shard.get(token)?.iter().find(|c| &*c.app_version == app_version)?;
        (entry.expires > now).then(|| Resolved {
            endpoint_id: entry.endpoint_id.clone(),
            token_id: entry.token_id.clone(),
            expires: entry.expires,
        })
    }

    /// Answers from what is known without asking the provider: the positive cache, a token
    /// over the length limit, the negative cache. `None`: the provider must be asked.
    pub(crate) fn known(
        &self,
        app_version: &str,
        token: &str,
    ) -> Option<Result<Resolved, (KpError, Refusal)>> {
        if token.len() > self.max_token_bytes {
            let e = KpError::unauthorized("endpoint token too long");
            return Some(Err((e, Refusal::TokenTooLong)));
        }
        let now = Instant::now();
        if let Some(hit) = self.cached(app_version, token, now) {
            return Some(Ok(hit));
        }
        let key = negative_key(app_version, token);
        let refused = self.negative.get(&key)?;
        if refused.expires > now {
            return Some(Err((refused.error, Refusal::NegativeCache)));
        }
        self.negative.remove(&key);
        None
    }

    /// Asks the provider for the endpoint id of `token` in `app_version` and until when it may
    /// be trusted: 401 when the provider does not know it, 503 when it does not answer. Call
    /// [`TokenCache::known`] first.
    pub(crate) async fn lookup(
        &self,
        app_version: &str,
        token: &str,
        misses: &Counter,
    ) -> Result<Resolved, (KpError, Refusal)> {
        misses.inc();
        let unavailable = |e: KpError| (e, Refusal::ProviderUnavailable);
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
                unavailable(KpError::unavailable("no authentication service is running"))
            }
            _ => unavailable(KpError::unavailable("the authentication service did not answer")),
        })?;
        let answer = EndpointTokenValidationResponse::decode(&reply.payload).map_err(|e| {
            tracing::warn!(error = %e, "undecodable ep-token-response");
            unavailable(KpError::unavailable(
                "the authentication service gave an unreadable answer",
            ))
        })?;
        let refused = match (answer.status_code, answer.endpoint_id) {
            (200..=299, Some(id)) => {
                let endpoint_id = Arc::<str>::from(id);
                let token_id = answer.token_id.map(Arc::<str>::from);
                let expires = Instant::now() + self.ttl;
                let entry = Cached {
                    app_version: app_version.into(),
                    endpoint_id: endpoint_id.clone(),
                    token_id: token_id.clone(),
                    expires,
                };
                let mut shard = self.cache.shard(token);
                let entries = shard.entry(token.into()).or_default();
                entries.retain(|c| &*c.app_version != app_version);
                entries.push(entry);
                return Ok(Resolved { endpoint_id, token_id, expires });
            }
            (200..=299 | 401 | 404, _) => {
                (KpError::unauthorized("unknown endpoint token"), Refusal::UnknownToken)
            }
            (403, _) => (
                KpError::forbidden(
                    answer.reason_phrase.unwrap_or("token not permitted").to_owned(),
                ),
                Refusal::TokenForbidden,
            ),
            (status, _) => {
                tracing::warn!(status, "token validation failed");
                return Err(unavailable(KpError::unavailable("the authentication service failed")));
            }
        };
        let entry =
            Refused { error: refused.0.clone(), expires: Instant::now() + self.negative_ttl };
        self.negative.insert(negative_key(app_version, token), entry);
        Err(refused)
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

    /// Forgets the cached tokens a 16/ECAP revocation names: of `endpoint_id`, under an app
    /// version `in_app` accepts, with one of `token_ids` (any token when the list is empty or
    /// the provider gave the token no id).
    pub(crate) fn evict_revoked(
        &self,
        endpoint_id: &str,
        in_app: &dyn Fn(&str) -> bool,
        token_ids: &[&str],
    ) {
        self.cache.for_each_shard(|map| {
            map.retain(|_, entries| {
                entries.retain(|c| {
                    !(*c.endpoint_id == *endpoint_id
                        && in_app(&c.app_version)
                        && revoked_token(c.token_id.as_deref(), token_ids))
                });
                !entries.is_empty()
            });
        });
    }
}

/// Whether a token with id `token_id` is among `revoked` (an empty list revokes every token of
/// the endpoint; a token the provider gave no id cannot be told apart, so it goes too).
pub(crate) fn revoked_token(token_id: Option<&str>, revoked: &[&str]) -> bool {
    revoked.is_empty() || token_id.is_none_or(|id| revoked.contains(&id))
}
