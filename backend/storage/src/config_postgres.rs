//! The PostgreSQL configuration store (`storage.postgres.url`), shared by ECR replicas.
//!
//! Tables `ecr_configs` (primary key app version, endpoint — `''` for the default — and name),
//! `ecr_statuses` (per app version, endpoint, name, configuration id) and `ecr_schemas`,
//! created by the storage crate's shared migrations. A put is one upsert that keeps the
//! creation time; a status event is one upsert that sets only its own columns, so replicas
//! recording a dispatch and a confirmation at once do not undo each other.

use tokio_postgres::Row;

use crate::config::{
    ConfigKey, ConfigStatus, ConfigStore, StatusEvent, StatusFilter, StoredConfig, new_config_id,
};
use crate::postgres::{Connection, backend, migrate};
use crate::{BoxFuture, StorageError};

/// The PostgreSQL configuration store.
pub struct PostgresConfigStore {
    connection: Connection,
}

impl std::fmt::Debug for PostgresConfigStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfigStore").finish_non_exhaustive()
    }
}

impl PostgresConfigStore {
    /// A store on the database at `url`. Nothing connects until [`ConfigStore::open`].
    pub fn new(url: &str) -> Self {
        Self { connection: Connection::new(url) }
    }
}

fn config_of(key: ConfigKey, row: &Row) -> StoredConfig {
    StoredConfig {
        key,
        config_id: row.get("config_id"),
        content: row.get("content"),
        created_ms: row.get("created_ms"),
        updated_ms: row.get("updated_ms"),
    }
}

fn endpoint_column(key: &ConfigKey) -> &str {
    key.endpoint.as_deref().unwrap_or("")
}

impl ConfigStore for PostgresConfigStore {
    fn open(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            migrate(&self.connection).await.map_err(|e| StorageError::Open {
                setting: "storage.postgres.url",
                source: Box::new(e),
            })
        })
    }

    fn put(
        &self,
        key: ConfigKey,
        content: Vec<u8>,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<StoredConfig, StorageError>> {
        Box::pin(async move {
            let client = self.connection.get().await?;
            let row = client
                .query_one(
                    "INSERT INTO ecr_configs AS c
                       (app_version, endpoint, name, config_id, content, created_ms, updated_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $6)
                     ON CONFLICT (app_version, endpoint, name) DO UPDATE
                       SET config_id = excluded.config_id, content = excluded.content,
                           updated_ms = excluded.updated_ms
                     RETURNING config_id, content, created_ms, updated_ms",
                    &[
                        &key.app_version,
                        &endpoint_column(&key),
                        &key.name,
                        &new_config_id(),
                        &content,
                        &now_ms,
                    ],
                )
                .await
                .map_err(backend)?;
            Ok(config_of(key, &row))
        })
    }

    fn get(&self, key: ConfigKey) -> BoxFuture<'_, Result<Option<StoredConfig>, StorageError>> {
        Box::pin(async move {
            let client = self.connection.get().await?;
            let row = client
                .query_opt(
                    "SELECT config_id, content, created_ms, updated_ms FROM ecr_configs
                     WHERE app_version = $1 AND endpoint = $2 AND name = $3",
                    &[&key.app_version, &endpoint_column(&key), &key.name],
                )
                .await
                .map_err(backend)?;
            Ok(row.map(|r| config_of(key, &r)))
        })
    }

    fn delete(&self, key: ConfigKey) -> BoxFuture<'_, Result<bool, StorageError>> {
        Box::pin(async move {
            let client = self.connection.get().await?;
            let n = client
                .execute(
                    "DELETE FROM ecr_configs WHERE app_version = $1 AND endpoint = $2 AND name = $3",
                    &[&key.app_version, &endpoint_column(&key), &key.name],
                )
                .await
                .map_err(backend)?;
            Ok(n > 0)
        })
    }

    fn list(
        &self,
        app_version: &str,
        endpoint: Option<&str>,
    ) -> BoxFuture<'_, Result<Vec<StoredConfig>, StorageError>> {
        let (app_version, endpoint) = (app_version.to_owned(), endpoint.map(str::to_owned));
        Box::pin(async move {
            let client = self.connection.get().await?;
            let rows = client
                .query(
                    "SELECT name, config_id, content, created_ms, updated_ms FROM ecr_configs
                     WHERE app_version = $1 AND endpoint = $2 ORDER BY name COLLATE \"C\"",
                    &[&app_version, &endpoint.as_deref().unwrap_or("")],
                )
                .await
                .map_err(backend)?;
            Ok(rows
                .iter()
                .map(|r| {
                    let key = ConfigKey {
                        app_version: app_version.clone(),
                        endpoint: endpoint.clone(),
                        name: r.get("name"),
                    };
                    config_of(key, r)
                })
                .collect())
        })
    }

    fn set_schema(
        &self,
        app_version: &str,
        schema: Option<Vec<u8>>,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        let app_version = app_version.to_owned();
        Box::pin(async move {
            let client = self.connection.get().await?;
            match schema {
                Some(s) => {
                    client
                        .execute(
                            "INSERT INTO ecr_schemas (app_version, schema) VALUES ($1, $2)
                     ON CONFLICT (app_version) DO UPDATE SET schema = excluded.schema",
                            &[&app_version, &s],
                        )
                        .await
                }
                None => {
                    client
                        .execute("DELETE FROM ecr_schemas WHERE app_version = $1", &[&app_version])
                        .await
                }
            }
            .map_err(backend)?;
            Ok(())
        })
    }

    fn schema(&self, app_version: &str) -> BoxFuture<'_, Result<Option<Vec<u8>>, StorageError>> {
        let app_version = app_version.to_owned();
        Box::pin(async move {
            let client = self.connection.get().await?;
            let row = client
                .query_opt("SELECT schema FROM ecr_schemas WHERE app_version = $1", &[&app_version])
                .await
                .map_err(backend)?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn record(
        &self,
        app_version: &str,
        endpoint: &str,
        name: &str,
        config_id: &str,
        event: StatusEvent,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        let keys = [app_version, endpoint, name, config_id].map(str::to_owned);
        Box::pin(async move {
            let client = self.connection.get().await?;
            let [a, e, n, c] = &keys;
            match event {
                StatusEvent::Dispatched => {
                    client
                        .execute(
                    "INSERT INTO ecr_statuses (app_version, endpoint, name, config_id, dispatched_ms)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (app_version, endpoint, name, config_id)
                       DO UPDATE SET dispatched_ms = excluded.dispatched_ms",
                    &[a, e, n, c, &now_ms],
                        )
                        .await
                }
                StatusEvent::Confirmed { status_code, reason } => {
                    client
                        .execute(
                    "INSERT INTO ecr_statuses
                       (app_version, endpoint, name, config_id, confirmed_ms, status_code, reason)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (app_version, endpoint, name, config_id)
                       DO UPDATE SET confirmed_ms = excluded.confirmed_ms,
                         status_code = excluded.status_code, reason = excluded.reason",
                    &[a, e, n, c, &now_ms, &status_code, &reason],
                        )
                        .await
                }
            }
            .map_err(backend)?;
            Ok(())
        })
    }

    fn configured_endpoints(
        &self,
        app_version: Option<&str>,
    ) -> BoxFuture<'_, Result<Vec<(String, String)>, StorageError>> {
        let app_version = app_version.map(str::to_owned);
        Box::pin(async move {
            let client = self.connection.get().await?;
            let rows = client
                .query(
                    "SELECT app_version, endpoint FROM ecr_configs
                     WHERE endpoint <> '' AND ($1::text IS NULL OR app_version = $1)
                     GROUP BY app_version, endpoint
                     ORDER BY app_version COLLATE \"C\", endpoint COLLATE \"C\"",
                    &[&app_version],
                )
                .await
                .map_err(backend)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn statuses(
        &self,
        filter: StatusFilter,
    ) -> BoxFuture<'_, Result<Vec<ConfigStatus>, StorageError>> {
        Box::pin(async move {
            let client = self.connection.get().await?;
            let rows = client
                .query(
                    "SELECT app_version, endpoint, name, config_id, dispatched_ms, confirmed_ms,
                            status_code, reason
                     FROM ecr_statuses
                     WHERE ($1::text IS NULL OR endpoint = $1)
                       AND ($2::text IS NULL OR app_version = $2)
                       AND ($3::text IS NULL OR config_id = $3)
                     ORDER BY app_version COLLATE \"C\", endpoint COLLATE \"C\",
                              name COLLATE \"C\", config_id COLLATE \"C\"",
                    &[&filter.endpoint, &filter.app_version, &filter.config_id],
                )
                .await
                .map_err(backend)?;
            Ok(rows
                .iter()
                .map(|r| ConfigStatus {
                    app_version: r.get(0),
                    endpoint: r.get(1),
                    name: r.get(2),
                    config_id: r.get(3),
                    dispatched_ms: r.get(4),
                    confirmed_ms: r.get(5),
                    status_code: r.get(6),
                    reason: r.get(7),
                })
                .collect())
        })
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate_testkit::PostgresServer;

    async fn opened(server: &PostgresServer) -> PostgresConfigStore {
        let store = PostgresConfigStore::new(&server.url());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match store.open().await {
                Ok(()) => return store,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "waiting for PostgreSQL");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("PostgreSQL does not answer: {e}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_config_suite() {
        let server = PostgresServer::start();
        let store = opened(&server).await;
        crate::config_suite::run(&store).await;
        // A replica on the same database (migrations already applied) sees the same data,
        // and the time-series store migrates beside it.
        let written = crate::config_suite::write_some(&store).await;
        let replica = opened(&server).await;
        crate::config_suite::check_some(&replica, &written).await;
        let series = crate::PostgresStore::new(&server.url());
        crate::TimeSeriesStore::open(&series).await.unwrap();
    }
}
