//! Storage for the services that keep data: time series (EPTS) and configurations (ECR).
//!
//! One object-safe trait, [`TimeSeriesStore`], and two implementations chosen by
//! [`StorageConfig`]: the embedded [`EmbeddedStore`] (fjall, under `storage.path`, needs no
//! server; the default) and [`PostgresStore`] (`storage.postgres.url`, shared by replicas). Points are keyed by
//! (application, series, endpoint, timestamp): writing a point whose key exists overwrites it,
//! so a re-sent sample never duplicates. Every store keeps the last point of each
//! (application, series, endpoint) in memory, answers range queries with a limit and an
//! order, and deletes points older than a cut-off for the retention sweep.
//!
//! [`suite`] is the one behaviour test every implementation passes.
//!
//! [`ConfigStore`] (module [`config`]) is the configuration store of ECR, with the same two
//! implementations ([`EmbeddedConfigStore`], [`PostgresConfigStore`]) and its own shared
//! suite, [`config_suite`].
//!
//! This crate knows nothing of the bus, of Avro or of JSON: it stores named values.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
mod config_embedded;
mod config_postgres;
pub mod config_suite;
mod embedded;
mod last;
mod postgres;
pub mod suite;

use std::future::Future;
use std::pin::Pin;

pub use config::{ConfigKey, ConfigStatus, ConfigStore, StatusEvent, StatusFilter, StoredConfig};
pub use config_embedded::EmbeddedConfigStore;
pub use config_postgres::PostgresConfigStore;
pub use embedded::EmbeddedStore;
pub use postgres::PostgresStore;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// `storage.*`: where services keep their data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory of the embedded store; each service keeps its data in a subdirectory named
    /// after it.
    pub path: PathBuf,
    /// PostgreSQL, shared by replicas; when its `url` is set it replaces the embedded store.
    pub postgres: PostgresConfig,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { path: PathBuf::from("fleetgate-data/storage"), postgres: PostgresConfig::default() }
    }
}

/// `storage.postgres.*`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database`; unset: the embedded store.
    pub url: Option<String>,
}

impl StorageConfig {
    /// The time-series store of `service` that this configuration names (the embedded one is
    /// opened here; call [`TimeSeriesStore::open`] before use either way).
    pub fn open_time_series(
        &self,
        service: &str,
    ) -> Result<Arc<dyn TimeSeriesStore>, StorageError> {
        match &self.postgres.url {
            Some(url) if !url.is_empty() => Ok(Arc::new(PostgresStore::new(url))),
            _ => Ok(Arc::new(EmbeddedStore::open(&self.path.join(service))?)),
        }
    }

    /// The configuration store of `service` that this configuration names (call
    /// [`ConfigStore::open`] before use).
    pub fn open_config(&self, service: &str) -> Result<Arc<dyn ConfigStore>, StorageError> {
        match &self.postgres.url {
            Some(url) if !url.is_empty() => Ok(Arc::new(PostgresConfigStore::new(url))),
            _ => Ok(Arc::new(EmbeddedConfigStore::open(&self.path.join(service))?)),
        }
    }
}

/// A boxed, sendable future: what the object-safe [`TimeSeriesStore`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One named value of a point. The kinds are those of a 14/TSTP `DataPoint` value that a JSON
/// sample can carry.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// An explicit `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// An integer.
    Long(i64),
    /// Any other number.
    Double(f64),
    /// A string.
    String(String),
}

/// One point of one series of one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The application the series belongs to.
    pub app: String,
    /// The series name.
    pub series: String,
    /// The endpoint id.
    pub endpoint: String,
    /// The point's time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// Its named values, in the order they were configured.
    pub values: Vec<(String, Value)>,
}

/// Oldest or newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Oldest first.
    #[default]
    Ascending,
    /// Newest first.
    Descending,
}

/// Points of some series of an application within a time range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeQuery {
    /// The application.
    pub app: String,
    /// The series (at least one).
    pub series: Vec<String>,
    /// The endpoints; `None`: every endpoint that has points.
    pub endpoints: Option<Vec<String>>,
    /// The first millisecond included.
    pub from_ms: i64,
    /// The last millisecond included.
    pub to_ms: i64,
    /// Which end of the range comes first, and which points the limit keeps.
    pub order: Order,
    /// At most this many points in all.
    pub limit: usize,
}

/// The newest point of each (series, endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastQuery {
    /// The application.
    pub app: String,
    /// The series (at least one).
    pub series: Vec<String>,
    /// The endpoints; `None`: every endpoint that has points.
    pub endpoints: Option<Vec<String>>,
    /// Only points strictly before this time, Unix milliseconds; `None`: the newest.
    pub before_ms: Option<i64>,
}

/// Why a store failed. Always the backend's fault (disk, database), never a device's.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The store cannot be opened (path, permissions, another process holds it, database
    /// unreachable).
    #[error("{setting}: cannot open the store: {source}")]
    Open {
        /// The setting that names it.
        setting: &'static str,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The embedded store failed to read, write or sync.
    #[error("the embedded store failed: {0}")]
    Embedded(#[from] fjall::Error),
    /// A record on disk that this version cannot read (corruption or a newer version).
    #[error("a stored point is unreadable")]
    Corrupt,
    /// A name too long to store (over 65535 bytes).
    #[error("a name of {0} bytes is too long to store")]
    NameTooLong(usize),
    /// A blocking task of the store panicked or was cancelled (a bug).
    #[error("a storage task failed: {0}")]
    Task(String),
    /// Another backend's failure (e.g. PostgreSQL).
    #[error("the store failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A time-series store. Shared as `Arc<dyn TimeSeriesStore>` by a service's tasks.
pub trait TimeSeriesStore: Send + Sync {
    /// Connects and prepares the store (PostgreSQL: migrations); called once at start-up,
    /// before any other method. A store that opened when it was made does nothing here.
    fn open(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Stores `points`, overwriting points with the same key (within `points`, the later one
    /// wins). Resolves once they are durable: only then may anyone hear "stored".
    fn write(&self, points: Arc<Vec<Point>>) -> BoxFuture<'_, Result<(), StorageError>>;

    /// The points of `query`, ordered by time (ties by endpoint, then series), at most
    /// `query.limit`.
    fn range(&self, query: RangeQuery) -> BoxFuture<'_, Result<Vec<Point>, StorageError>>;

    /// The newest point of each (series, endpoint) of `query`, from memory unless
    /// `before_ms` asks for an older one. Ordered by endpoint, then series.
    fn last(&self, query: LastQuery) -> BoxFuture<'_, Result<Vec<Point>, StorageError>>;

    /// Deletes the points of `app` older than `before_ms`; returns how many.
    fn sweep(&self, app: &str, before_ms: i64) -> BoxFuture<'_, Result<u64, StorageError>>;

    /// The series of `app` that have points, sorted.
    fn series(&self, app: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>>;

    /// The endpoints that have points of `app`, sorted.
    fn endpoints(&self, app: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>>;

    /// `embedded` or `postgres`, for logs and metrics.
    fn kind(&self) -> &'static str;
}

/// Sorts points by time (ties by endpoint, then series) in `order` and keeps `limit`.
pub(crate) fn sort_and_limit(points: &mut Vec<Point>, order: Order, limit: usize) {
    points.sort_by(|a, b| {
        let by_time = a.timestamp_ms.cmp(&b.timestamp_ms);
        let by_time = if order == Order::Descending { by_time.reverse() } else { by_time };
        by_time.then_with(|| a.endpoint.cmp(&b.endpoint)).then_with(|| a.series.cmp(&b.series))
    });
    points.truncate(limit);
}
