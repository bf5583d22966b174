//! The PostgreSQL store, for replicas that share data (`storage.postgres.url`).
//!
//! One table, `epts_points`, primary key (app, series, endpoint, ts), range-partitioned on
//! `ts` (Unix milliseconds) in 28-day partitions created as points need them (a default
//! partition takes what lies outside years 1900 to 3000). A batch is one
//! `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE`: one statement and one round
//! trip however many points, and a re-sent point overwrites. Values are stored in the same
//! compact binary form as the embedded store. Migrations run at start-up under an advisory
//! lock, so replicas starting together apply them once.
//!
//! The last point of a key is read with one index probe per key (`DISTINCT ON` over the
//! primary key) rather than kept in a "latest" table: replicas write the same keys, and a
//! latest-row upsert per point is what overloads PostgreSQL first. Writes and reads use two
//! connections, each re-established when it breaks.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio_postgres::{Client, NoTls};

use crate::embedded::{decode_values, encode_values};
use crate::{BoxFuture, LastQuery, Order, Point, RangeQuery, StorageError, TimeSeriesStore};

/// Width of one time partition.
const PARTITION_MS: i64 = 28 * 86_400_000;
/// Partitions are created for this range of times; other points go to the default partition.
const PARTITIONED_FROM_MS: i64 = -2_208_988_800_000; // 1900-01-01
const PARTITIONED_TO_MS: i64 = 32_503_680_000_000; // 3000-01-01

/// The migrations, in order; each runs once per database.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE epts_points (
        app text NOT NULL,
        series text NOT NULL,
        endpoint text NOT NULL,
        ts bigint NOT NULL,
        point_values bytea NOT NULL,
        PRIMARY KEY (app, series, endpoint, ts)
     ) PARTITION BY RANGE (ts);
     CREATE TABLE epts_points_default PARTITION OF epts_points DEFAULT;",
    // The configuration store (ECR); `endpoint` is '' for an app version's default.
    "CREATE TABLE ecr_configs (
        app_version text NOT NULL,
        endpoint text NOT NULL,
        name text NOT NULL,
        config_id text NOT NULL,
        content bytea NOT NULL,
        created_ms bigint NOT NULL,
        updated_ms bigint NOT NULL,
        PRIMARY KEY (app_version, endpoint, name)
     );
     CREATE TABLE ecr_statuses (
        app_version text NOT NULL,
        endpoint text NOT NULL,
        name text NOT NULL,
        config_id text NOT NULL,
        dispatched_ms bigint,
        confirmed_ms bigint,
        status_code integer,
        reason text,
        PRIMARY KEY (app_version, endpoint, name, config_id)
     );
     CREATE INDEX ecr_statuses_endpoint ON ecr_statuses (endpoint);
     CREATE TABLE ecr_schemas (app_version text PRIMARY KEY, schema bytea NOT NULL);",
];

pub(crate) fn backend(e: tokio_postgres::Error) -> StorageError {
    StorageError::Backend(Box::new(e))
}

/// A connection re-established when it breaks.
pub(crate) struct Connection {
    url: String,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl Connection {
    pub(crate) fn new(url: &str) -> Self {
        Self { url: url.to_owned(), client: tokio::sync::Mutex::new(None) }
    }

    pub(crate) async fn get(&self) -> Result<Arc<Client>, StorageError> {
        let mut held = self.client.lock().await;
        if let Some(c) = held.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let (client, connection) =
            tokio_postgres::connect(&self.url, NoTls).await.map_err(backend)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection ended");
            }
        });
        let client = Arc::new(client);
        *held = Some(client.clone());
        Ok(client)
    }
}

/// The PostgreSQL time-series store.
pub struct PostgresStore {
    writer: Connection,
    reader: Connection,
    /// Partitions known to exist.
    partitions: Mutex<HashSet<i64>>,
    /// Serializes writes: partition creation, then the batch.
    write_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// A store on the database at `url` (`postgres://user:password@host:port/db`). Nothing
    /// connects until [`TimeSeriesStore::open`].
    pub fn new(url: &str) -> Self {
        Self {
            writer: Connection::new(url),
            reader: Connection::new(url),
            partitions: Mutex::new(HashSet::new()),
            write_lock: tokio::sync::Mutex::new(()),
        }
    }

    async fn migrate(&self) -> Result<(), StorageError> {
        migrate(&self.writer).await
    }

    /// Creates the partitions `points` fall in that are not known to exist.
    async fn ensure_partitions(
        &self,
        client: &Client,
        points: &[Point],
    ) -> Result<(), StorageError> {
        let needed: HashSet<i64> = points
            .iter()
            .filter(|p| (PARTITIONED_FROM_MS..PARTITIONED_TO_MS).contains(&p.timestamp_ms))
            .map(|p| p.timestamp_ms.div_euclid(PARTITION_MS))
            .collect();
        let missing: Vec<i64> = {
            let known = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            needed.into_iter().filter(|n| !known.contains(n)).collect()
        };
        for n in missing {
            let (from, to) = (n * PARTITION_MS, (n + 1) * PARTITION_MS);
            let name =
                if n < 0 { format!("epts_points_m{}", -n) } else { format!("epts_points_p{n}") };
            // Under the advisory lock, replicas do not race to create the same partition; points
            // of its range already in the default partition are moved into it.
            let sql = format!(
                "BEGIN;
                 SELECT pg_advisory_xact_lock(7165032);
                 DO $$ BEGIN
                   IF to_regclass('{name}') IS NULL THEN
                     CREATE TEMP TABLE fleetgate_moved ON COMMIT DROP AS
                       SELECT * FROM epts_points_default WHERE ts >= {from} AND ts < {to};
                     DELETE FROM epts_points_default WHERE ts >= {from} AND ts < {to};
                     CREATE TABLE {name} PARTITION OF epts_points FOR VALUES FROM ({from}) TO ({to});
                     INSERT INTO epts_points SELECT * FROM fleetgate_moved;
                   END IF;
                 END $$;
                 COMMIT;"
            );
            if let Err(e) = client.batch_execute(&sql).await {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(backend(e));
            }
            self.partitions.lock().unwrap_or_else(|p| p.into_inner()).insert(n);
        }
        Ok(())
    }

    async fn write_points(&self, points: &[Point]) -> Result<(), StorageError> {
        if points.is_empty() {
            return Ok(());
        }
        let _serial = self.write_lock.lock().await;
        let client = self.writer.get().await?;
        self.ensure_partitions(&client, points).await?;
        // ON CONFLICT may not touch one row twice in a statement: the later point of a key wins.
        let mut latest: std::collections::HashMap<(&str, &str, &str, i64), usize> =
            std::collections::HashMap::with_capacity(points.len());
        for (i, p) in points.iter().enumerate() {
            latest.insert((&p.app, &p.series, &p.endpoint, p.timestamp_ms), i);
        }
        let n = latest.len();
        let (mut apps, mut series, mut endpoints, mut ts, mut values) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for i in latest.into_values() {
            let p = &points[i];
            apps.push(p.app.as_str());
            series.push(p.series.as_str());
            endpoints.push(p.endpoint.as_str());
            ts.push(p.timestamp_ms);
            values.push(encode_values(&p.values));
        }
        client
            .execute(
                "INSERT INTO epts_points (app, series, endpoint, ts, point_values)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bytea[])
                 ON CONFLICT (app, series, endpoint, ts) DO UPDATE SET point_values = EXCLUDED.point_values",
                &[&apps, &series, &endpoints, &ts, &values],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn range_points(&self, q: RangeQuery) -> Result<Vec<Point>, StorageError> {
        if q.from_ms > q.to_ms || q.limit == 0 {
            return Ok(Vec::new());
        }
        let client = self.reader.get().await?;
        let order = match q.order {
            Order::Ascending => "ASC",
            Order::Descending => "DESC",
        };
        let sql = format!(
            "SELECT series, endpoint, ts, point_values FROM epts_points
             WHERE app = $1 AND series = ANY($2) AND ($3::text[] IS NULL OR endpoint = ANY($3))
               AND ts >= $4 AND ts <= $5
             ORDER BY ts {order}, endpoint, series LIMIT $6"
        );
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let rows = client
            .query(&sql, &[&q.app, &q.series, &q.endpoints, &q.from_ms, &q.to_ms, &limit])
            .await
            .map_err(backend)?;
        rows.iter().map(|r| point_of(&q.app, r)).collect()
    }

    async fn last_points(&self, q: LastQuery) -> Result<Vec<Point>, StorageError> {
        let client = self.reader.get().await?;
        let rows = client
            .query(
                "SELECT DISTINCT ON (series, endpoint) series, endpoint, ts, point_values
                 FROM epts_points
                 WHERE app = $1 AND series = ANY($2) AND ($3::text[] IS NULL OR endpoint = ANY($3))
                   AND ($4::bigint IS NULL OR ts < $4)
                 ORDER BY series, endpoint, ts DESC",
                &[&q.app, &q.series, &q.endpoints, &q.before_ms],
            )
            .await
            .map_err(backend)?;
        let mut points: Vec<Point> =
            rows.iter().map(|r| point_of(&q.app, r)).collect::<Result<_, _>>()?;
        points.sort_by(|a, b| a.endpoint.cmp(&b.endpoint).then_with(|| a.series.cmp(&b.series)));
        Ok(points)
    }

    async fn distinct(&self, column: &str, app: &str) -> Result<Vec<String>, StorageError> {
        let client = self.reader.get().await?;
        let sql = format!("SELECT DISTINCT {column} FROM epts_points WHERE app = $1 ORDER BY 1");
        let rows = client.query(&sql, &[&app]).await.map_err(backend)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// Applies the migrations of every store not applied yet, once per database (replicas that
/// start together wait on an advisory lock).
pub(crate) async fn migrate(connection: &Connection) -> Result<(), StorageError> {
    let client = connection.get().await?;
    client
        .batch_execute(
            "BEGIN;
             SELECT pg_advisory_xact_lock(7165031);
             CREATE TABLE IF NOT EXISTS fleetgate_storage_migrations (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now());",
        )
        .await
        .map_err(backend)?;
    let done = async {
        let row = client
            .query_one("SELECT coalesce(max(version), 0) FROM fleetgate_storage_migrations", &[])
            .await?;
        let applied: i32 = row.get(0);
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
            client.batch_execute(migration).await?;
            let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
            client
                .execute(
                    "INSERT INTO fleetgate_storage_migrations (version) VALUES ($1)",
                    &[&version],
                )
                .await?;
            tracing::info!(version, "PostgreSQL storage migration applied");
        }
        client.batch_execute("COMMIT").await
    }
    .await;
    if let Err(e) = done {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(backend(e));
    }
    Ok(())
}

fn point_of(app: &str, row: &tokio_postgres::Row) -> Result<Point, StorageError> {
    let bytes: &[u8] = row.get(3);
    Ok(Point {
        app: app.to_owned(),
        series: row.get(0),
        endpoint: row.get(1),
        timestamp_ms: row.get(2),
        values: decode_values(bytes).ok_or(StorageError::Corrupt)?,
    })
}

impl TimeSeriesStore for PostgresStore {
    fn open(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            self.migrate().await.map_err(|e| StorageError::Open {
                setting: "storage.postgres.url",
                source: Box::new(e),
            })
        })
    }

    fn write(&self, points: Arc<Vec<Point>>) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move { self.write_points(&points).await })
    }

    fn range(&self, query: RangeQuery) -> BoxFuture<'_, Result<Vec<Point>, StorageError>> {
        Box::pin(self.range_points(query))
    }

    fn last(&self, query: LastQuery) -> BoxFuture<'_, Result<Vec<Point>, StorageError>> {
        Box::pin(self.last_points(query))
    }

    fn sweep(&self, app: &str, before_ms: i64) -> BoxFuture<'_, Result<u64, StorageError>> {
        let app = app.to_owned();
        Box::pin(async move {
            let _serial = self.write_lock.lock().await;
            let client = self.writer.get().await?;
            client
                .execute("DELETE FROM epts_points WHERE app = $1 AND ts < $2", &[&app, &before_ms])
                .await
                .map_err(backend)
        })
    }

    fn series(&self, app: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        let app = app.to_owned();
        Box::pin(async move { self.distinct("series", &app).await })
    }

    fn endpoints(&self, app: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        let app = app.to_owned();
        Box::pin(async move { self.distinct("endpoint", &app).await })
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate_testkit::PostgresServer;

    async fn opened(server: &PostgresServer) -> PostgresStore {
        let store = PostgresStore::new(&server.url());
        // The server accepts connections a moment before it takes queries.
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
    async fn passes_the_storage_suite() {
        let server = PostgresServer::start();
        let store = opened(&server).await;
        crate::suite::run(&store).await;
        // Migrations run once: a second store (a replica) on the same database opens too.
        let replica = opened(&server).await;
        crate::suite::check_some(&replica).await;
    }
}
