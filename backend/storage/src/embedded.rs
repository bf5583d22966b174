//! The embedded store: two fjall keyspaces under `storage.path`.
//!
//! * `points`: key = (application, series, endpoint) as length-prefixed strings, then the
//!   timestamp as 8 big-endian bytes with the sign bit flipped (so keys sort by time, also
//!   before 1970); value = the named values. A re-sent point has the same key and overwrites.
//! * `last`: the same (application, series, endpoint) prefix → timestamp and values of the
//!   newest point, so the in-memory last points come back after a restart without a scan.
//!
//! Writes are serialized (one batch and one fsync at a time: callers batch, EPTS does), so the
//! decision which point is the newest and the memory that holds it stay consistent.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::last::LastPoints;
use crate::{
    BoxFuture, LastQuery, Order, Point, RangeQuery, StorageError, TimeSeriesStore, Value,
    sort_and_limit,
};

/// The embedded time-series store. Cheap to share; open one per directory.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    points: Keyspace,
    last_points: Keyspace,
    last: LastPoints,
    writer: Mutex<()>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `path` and loads the last points into memory.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let open = |source: Box<dyn std::error::Error + Send + Sync>| StorageError::Open {
            setting: "storage.path",
            source: format!("{}: {source}", path.display()).into(),
        };
        std::fs::create_dir_all(path).map_err(|e| open(e.into()))?;
        let db = Database::builder(path).open().map_err(|e| open(e.into()))?;
        let points =
            db.keyspace("points", KeyspaceCreateOptions::default).map_err(|e| open(e.into()))?;
        let last_points =
            db.keyspace("last", KeyspaceCreateOptions::default).map_err(|e| open(e.into()))?;
        let last = LastPoints::default();
        for item in last_points.iter() {
            let (key, value) = item.into_inner()?;
            let (app, series, endpoint) = decode_prefix(&key).ok_or(StorageError::Corrupt)?;
            let (ts, values) = decode_last(&value).ok_or(StorageError::Corrupt)?;
            last.offer(&Point { app, series, endpoint, timestamp_ms: ts, values });
        }
        let inner = Inner { db, points, last_points, last, writer: Mutex::new(()) };
        Ok(Self { inner: Arc::new(inner) })
    }
}

impl TimeSeriesStore for EmbeddedStore {
    fn write(&self, points: Arc<Vec<Point>>) -> BoxFuture<'_, Result<(), StorageError>> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || inner.write(points)))
    }

    fn range(&self, query: RangeQuery) -> BoxFuture<'_, Result<Vec<Point>, StorageError>> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || inner.range(&query)))
    }

    fn last(&self, query: LastQuery) -> BoxFuture<'_, Result<Vec<Point>, StorageError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            match query.before_ms {
                None => Ok(inner.last.get(&query)),
                Some(before) => blocking(move || inner.last_before(&query, before)).await,
            }
        })
    }

    fn sweep(&self, app: &str, before_ms: i64) -> BoxFuture<'_, Result<u64, StorageError>> {
        let inner = self.inner.clone();
        let app = app.to_owned();
        Box::pin(blocking(move || inner.sweep(&app, before_ms)))
    }

    fn series(&self, app: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        let mut names: Vec<String> =
            self.inner.last.all_keys(app).into_iter().map(|(s, _)| s).collect();
        names.dedup();
        Box::pin(std::future::ready(Ok(names)))
    }

    fn endpoints(&self, app: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        let mut names: Vec<String> =
            self.inner.last.all_keys(app).into_iter().map(|(_, e)| e).collect();
        names.sort_unstable();
        names.dedup();
        Box::pin(std::future::ready(Ok(names)))
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

/// Runs `f` where blocking is allowed: fjall reads and fsyncs block.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StorageError::Task(e.to_string()))?
}

impl Inner {
    fn write(&self, points: Arc<Vec<Point>>) -> Result<(), StorageError> {
        if points.is_empty() {
            return Ok(());
        }
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        // Within one batch the later point of a key wins: fjall gives every item of a batch the
        // same sequence number, so duplicates are removed here.
        let mut keys: HashMap<Vec<u8>, usize> = HashMap::with_capacity(points.len());
        for (i, p) in points.iter().enumerate() {
            let mut key = prefix(&p.app, &p.series, &p.endpoint)?;
            key.extend_from_slice(&ts_key(p.timestamp_ms));
            keys.insert(key, i);
        }
        let mut batch = self.db.batch();
        let mut newest: HashMap<(&str, &str, &str), usize> = HashMap::new();
        for (key, i) in keys {
            let p = &points[i];
            batch.insert(&self.points, key, encode_values(&p.values));
            let slot = newest.entry((&p.app, &p.series, &p.endpoint)).or_insert(i);
            if points[*slot].timestamp_ms < p.timestamp_ms {
                *slot = i;
            }
        }
        let mut became_last = Vec::new();
        for i in newest.into_values() {
            let p = &points[i];
            let newer = self
                .last
                .timestamp(&p.app, &p.series, &p.endpoint)
                .is_none_or(|held| held <= p.timestamp_ms);
            if newer {
                let mut value = p.timestamp_ms.to_be_bytes().to_vec();
                value.extend_from_slice(&encode_values(&p.values));
                batch.insert(&self.last_points, prefix(&p.app, &p.series, &p.endpoint)?, value);
                became_last.push(i);
            }
        }
        batch.commit()?;
        self.db.persist(PersistMode::SyncAll)?;
        for i in became_last {
            self.last.offer(&points[i]);
        }
        Ok(())
    }

    fn range(&self, query: &RangeQuery) -> Result<Vec<Point>, StorageError> {
        let keys = self.last.keys(&query.app, &query.series, query.endpoints.as_deref());
        let mut out = Vec::new();
        if query.from_ms > query.to_ms || query.limit == 0 {
            return Ok(out);
        }
        for (series, endpoint) in keys {
            let base = prefix(&query.app, &series, &endpoint)?;
            let mut from = base.clone();
            from.extend_from_slice(&ts_key(query.from_ms));
            let mut to = base;
            to.extend_from_slice(&ts_key(query.to_ms));
            let iter = self.points.range(from..=to);
            let iter: Box<dyn Iterator<Item = fjall::Guard>> = match query.order {
                Order::Ascending => Box::new(iter),
                Order::Descending => Box::new(iter.rev()),
            };
            for item in iter.take(query.limit) {
                let (key, value) = item.into_inner()?;
                out.push(Point {
                    app: query.app.clone(),
                    series: series.clone(),
                    endpoint: endpoint.clone(),
                    timestamp_ms: ts_of_key(&key).ok_or(StorageError::Corrupt)?,
                    values: decode_values(&value).ok_or(StorageError::Corrupt)?,
                });
            }
        }
        sort_and_limit(&mut out, query.order, query.limit);
        Ok(out)
    }

    fn last_before(&self, query: &LastQuery, before_ms: i64) -> Result<Vec<Point>, StorageError> {
        let mut out = Vec::new();
        for (series, endpoint) in
            self.last.keys(&query.app, &query.series, query.endpoints.as_deref())
        {
            let base = prefix(&query.app, &series, &endpoint)?;
            let mut from = base.clone();
            from.extend_from_slice(&ts_key(i64::MIN));
            let mut to = base;
            to.extend_from_slice(&ts_key(before_ms));
            if let Some(item) = self.points.range(from..to).next_back() {
                let (key, value) = item.into_inner()?;
                out.push(Point {
                    app: query.app.clone(),
                    series,
                    endpoint,
                    timestamp_ms: ts_of_key(&key).ok_or(StorageError::Corrupt)?,
                    values: decode_values(&value).ok_or(StorageError::Corrupt)?,
                });
            }
        }
        out.sort_by(|a, b| a.endpoint.cmp(&b.endpoint).then_with(|| a.series.cmp(&b.series)));
        Ok(out)
    }

    fn sweep(&self, app: &str, before_ms: i64) -> Result<u64, StorageError> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut removed = 0;
        for (series, endpoint) in self.last.all_keys(app) {
            let base = prefix(app, &series, &endpoint)?;
            let mut from = base.clone();
            from.extend_from_slice(&ts_key(i64::MIN));
            let mut to = base.clone();
            to.extend_from_slice(&ts_key(before_ms));
            let mut batch = self.db.batch();
            for item in self.points.range(from..to) {
                batch.remove(&self.points, item.key()?);
                removed += 1;
            }
            // A key whose newest point is gone has no points left at all.
            let key = (series, endpoint);
            let emptied = self.last.forget_if_older(app, &key, before_ms);
            if emptied {
                batch.remove(&self.last_points, base);
            }
            batch.commit()?;
        }
        self.db.persist(PersistMode::SyncAll)?;
        Ok(removed)
    }
}

/// The key prefix of (app, series, endpoint): each a big-endian u16 length and the bytes.
fn prefix(app: &str, series: &str, endpoint: &str) -> Result<Vec<u8>, StorageError> {
    let mut key = Vec::with_capacity(6 + app.len() + series.len() + endpoint.len() + 8);
    for part in [app, series, endpoint] {
        let len = u16::try_from(part.len()).map_err(|_| StorageError::NameTooLong(part.len()))?;
        key.extend_from_slice(&len.to_be_bytes());
        key.extend_from_slice(part.as_bytes());
    }
    Ok(key)
}

fn decode_prefix(mut key: &[u8]) -> Option<(String, String, String)> {
    let mut part = || {
        let len = usize::from(u16::from_be_bytes(key.get(..2)?.try_into().ok()?));
        let s = std::str::from_utf8(key.get(2..2 + len)?).ok()?.to_owned();
        key = &key[2 + len..];
        Some(s)
    };
    Some((part()?, part()?, part()?))
}

/// A timestamp as 8 bytes that sort like the numbers.
fn ts_key(ts: i64) -> [u8; 8] {
    ((ts as u64) ^ (1 << 63)).to_be_bytes()
}

fn ts_of_key(key: &[u8]) -> Option<i64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some((u64::from_be_bytes(tail) ^ (1 << 63)) as i64)
}

const NULL: u8 = 0;
const BOOL: u8 = 1;
const LONG: u8 = 2;
const DOUBLE: u8 = 3;
const STRING: u8 = 4;

/// Values as: count (u16), then per value its name (u16 length, bytes), a kind byte and the
/// value (bool: 1 byte; long, double: 8 bytes; string: u32 length, bytes).
pub(crate) fn encode_values(values: &[(String, Value)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + values.len() * 16);
    let count = u16::try_from(values.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for (name, value) in values.iter().take(usize::from(count)) {
        let name = &name.as_bytes()[..name.len().min(usize::from(u16::MAX))];
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name);
        match value {
            Value::Null => out.push(NULL),
            Value::Bool(b) => out.extend_from_slice(&[BOOL, u8::from(*b)]),
            Value::Long(l) => {
                out.push(LONG);
                out.extend_from_slice(&l.to_be_bytes());
            }
            Value::Double(d) => {
                out.push(DOUBLE);
                out.extend_from_slice(&d.to_be_bytes());
            }
            Value::String(s) => {
                out.push(STRING);
                let s = &s.as_bytes()[..s.len().min(u32::MAX as usize)];
                out.extend_from_slice(&(s.len() as u32).to_be_bytes());
                out.extend_from_slice(s);
            }
        }
    }
    out
}

pub(crate) fn decode_values(mut b: &[u8]) -> Option<Vec<(String, Value)>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (b.get(..n)?, b.get(n..)?);
        *b = rest;
        Some(head)
    }
    let count = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?);
    let mut values = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let len = usize::from(u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?));
        let name = std::str::from_utf8(take(&mut b, len)?).ok()?.to_owned();
        let value = match take(&mut b, 1)?[0] {
            NULL => Value::Null,
            BOOL => Value::Bool(take(&mut b, 1)?[0] != 0),
            LONG => Value::Long(i64::from_be_bytes(take(&mut b, 8)?.try_into().ok()?)),
            DOUBLE => Value::Double(f64::from_be_bytes(take(&mut b, 8)?.try_into().ok()?)),
            STRING => {
                let len = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
                Value::String(std::str::from_utf8(take(&mut b, len)?).ok()?.to_owned())
            }
            _ => return None,
        };
        values.push((name, value));
    }
    Some(values)
}

fn decode_last(b: &[u8]) -> Option<(i64, Vec<(String, Value)>)> {
    let ts = i64::from_be_bytes(b.get(..8)?.try_into().ok()?);
    Some((ts, decode_values(&b[8..])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_storage_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        crate::suite::run(&store).await;
    }

    #[tokio::test]
    async fn last_points_and_data_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        crate::suite::write_some(&store).await;
        drop(store);
        let store = EmbeddedStore::open(dir.path()).unwrap();
        crate::suite::check_some(&store).await;
    }

    #[test]
    fn keys_sort_by_time_across_zero() {
        let keys: Vec<_> = [i64::MIN, -5, -1, 0, 1, 1_700_000_000_000, i64::MAX]
            .iter()
            .map(|t| ts_key(*t))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        for t in [i64::MIN, -1, 0, 42, i64::MAX] {
            assert_eq!(ts_of_key(&ts_key(t)), Some(t));
        }
    }

    #[test]
    fn values_round_trip_and_truncated_records_are_refused() {
        let values = vec![
            ("a".to_owned(), Value::Null),
            ("b".to_owned(), Value::Bool(true)),
            ("c".to_owned(), Value::Long(-3)),
            ("d".to_owned(), Value::Double(21.5)),
            ("e".to_owned(), Value::String("héllo".into())),
        ];
        let bytes = encode_values(&values);
        assert_eq!(decode_values(&bytes), Some(values));
        for cut in 0..bytes.len() {
            assert_eq!(decode_values(&bytes[..cut]), None, "cut at {cut}");
        }
    }
}
