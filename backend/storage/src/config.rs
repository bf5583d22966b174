//! The configuration store (ECR): JSON configurations per app version (the default) and per
//! endpoint, each named (`default` when the device names none), with a new opaque `configId`
//! on every change, an optional JSON Schema per app version, and per endpoint and
//! configuration what was dispatched and what was confirmed.
//!
//! Configurations are kept as the bytes of their JSON text: this module never parses them.

use crate::{BoxFuture, StorageError};

/// Which configuration: the default of an app version (`endpoint: None`) or an endpoint's own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConfigKey {
    /// The app version.
    pub app_version: String,
    /// The endpoint; `None`: the app version's default.
    pub endpoint: Option<String>,
    /// The configuration name (`default` when a device names none).
    pub name: String,
}

impl ConfigKey {
    /// The default configuration `name` of `app_version`.
    pub fn default_of(app_version: &str, name: &str) -> Self {
        Self { app_version: app_version.into(), endpoint: None, name: name.into() }
    }

    /// The configuration `name` of `endpoint` in `app_version`.
    pub fn endpoint(app_version: &str, endpoint: &str, name: &str) -> Self {
        Self { app_version: app_version.into(), endpoint: Some(endpoint.into()), name: name.into() }
    }
}

/// A stored configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredConfig {
    /// Where it is stored.
    pub key: ConfigKey,
    /// Its opaque id; a new one on every change.
    pub config_id: String,
    /// The JSON text.
    pub content: Vec<u8>,
    /// When it was first stored, Unix milliseconds.
    pub created_ms: i64,
    /// When it was last changed, Unix milliseconds.
    pub updated_ms: i64,
}

/// What happened to one configuration (by id) of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigStatus {
    /// The app version.
    pub app_version: String,
    /// The endpoint.
    pub endpoint: String,
    /// The configuration name.
    pub name: String,
    /// The configuration id.
    pub config_id: String,
    /// When it was last fetched for delivery, Unix milliseconds.
    pub dispatched_ms: Option<i64>,
    /// When the endpoint last reported on it, Unix milliseconds.
    pub confirmed_ms: Option<i64>,
    /// The status code the endpoint reported (2xx: applied).
    pub status_code: Option<i32>,
    /// The reason the endpoint gave.
    pub reason: Option<String>,
}

impl ConfigStatus {
    /// Whether the endpoint reported it applied (a 2xx status).
    pub fn applied(&self) -> bool {
        self.status_code.is_some_and(|c| (200..300).contains(&c))
    }
}

/// Which statuses [`ConfigStore::statuses`] returns; `None` fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusFilter {
    /// Only this endpoint.
    pub endpoint: Option<String>,
    /// Only this app version.
    pub app_version: Option<String>,
    /// Only this configuration id.
    pub config_id: Option<String>,
}

impl StatusFilter {
    pub(crate) fn matches(&self, s: &ConfigStatus) -> bool {
        self.endpoint.as_ref().is_none_or(|e| *e == s.endpoint)
            && self.app_version.as_ref().is_none_or(|a| *a == s.app_version)
            && self.config_id.as_ref().is_none_or(|c| *c == s.config_id)
    }
}

/// A report on a configuration, recorded by [`ConfigStore::record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusEvent {
    /// It was fetched for delivery to the endpoint.
    Dispatched,
    /// The endpoint reported on it.
    Confirmed {
        /// The endpoint's status code (2xx: applied).
        status_code: i32,
        /// Its reason.
        reason: Option<String>,
    },
}

/// A configuration store. Shared as `Arc<dyn ConfigStore>` by a service's tasks; every
/// change is durable when its future resolves.
pub trait ConfigStore: Send + Sync {
    /// Connects and prepares the store (PostgreSQL: migrations); called once at start-up.
    fn open(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Stores `content` at `key` under a new configuration id (the creation time of a
    /// replaced configuration is kept) and returns what is stored.
    fn put(
        &self,
        key: ConfigKey,
        content: Vec<u8>,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<StoredConfig, StorageError>>;

    /// The configuration at `key`.
    fn get(&self, key: ConfigKey) -> BoxFuture<'_, Result<Option<StoredConfig>, StorageError>>;

    /// Deletes the configuration at `key`; returns whether there was one.
    fn delete(&self, key: ConfigKey) -> BoxFuture<'_, Result<bool, StorageError>>;

    /// The configurations of `endpoint` (`None`: the defaults) in `app_version`, by name.
    fn list(
        &self,
        app_version: &str,
        endpoint: Option<&str>,
    ) -> BoxFuture<'_, Result<Vec<StoredConfig>, StorageError>>;

    /// Sets (`Some`) or removes (`None`) the JSON Schema of `app_version`.
    fn set_schema(
        &self,
        app_version: &str,
        schema: Option<Vec<u8>>,
    ) -> BoxFuture<'_, Result<(), StorageError>>;

    /// The JSON Schema of `app_version`.
    fn schema(&self, app_version: &str) -> BoxFuture<'_, Result<Option<Vec<u8>>, StorageError>>;

    /// Records `event` for configuration `config_id` named `name` of `endpoint`.
    fn record(
        &self,
        app_version: &str,
        endpoint: &str,
        name: &str,
        config_id: &str,
        event: StatusEvent,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<(), StorageError>>;

    /// The statuses that `filter` matches, by app version, endpoint, name, configuration id.
    fn statuses(
        &self,
        filter: StatusFilter,
    ) -> BoxFuture<'_, Result<Vec<ConfigStatus>, StorageError>>;

    /// The (app version, endpoint) pairs with configurations of their own (of
    /// `app_version`, when given), in order.
    fn configured_endpoints(
        &self,
        app_version: Option<&str>,
    ) -> BoxFuture<'_, Result<Vec<(String, String)>, StorageError>>;

    /// `embedded` or `postgres`, for logs and metrics.
    fn kind(&self) -> &'static str;

    /// The configuration `endpoint` gets for `name`: its own, else the app version's default.
    fn effective(
        &self,
        app_version: &str,
        endpoint: &str,
        name: &str,
    ) -> BoxFuture<'_, Result<Option<StoredConfig>, StorageError>> {
        let own = ConfigKey::endpoint(app_version, endpoint, name);
        let default = ConfigKey::default_of(app_version, name);
        Box::pin(async move {
            match self.get(own).await? {
                Some(c) => Ok(Some(c)),
                None => self.get(default).await,
            }
        })
    }
}

/// A new opaque configuration id: 128 random bits in hex, like Kaa's.
pub(crate) fn new_config_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Applies `event` to `status`.
pub(crate) fn apply(status: &mut ConfigStatus, event: StatusEvent, now_ms: i64) {
    match event {
        StatusEvent::Dispatched => status.dispatched_ms = Some(now_ms),
        StatusEvent::Confirmed { status_code, reason } => {
            status.confirmed_ms = Some(now_ms);
            status.status_code = Some(status_code);
            status.reason = reason;
        }
    }
}
