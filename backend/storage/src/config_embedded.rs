//! The embedded configuration store: three fjall keyspaces under `storage.path/<service>`.
//!
//! * `configs`: key = app version, a scope byte (0 default, 1 endpoint), endpoint, name, as
//!   length-prefixed strings (so one app version's defaults, or one endpoint's, are one prefix
//!   scan, in name order); value = configuration id, created and updated times, JSON text.
//! * `statuses`: key = app version, endpoint, name, configuration id; value = the dispatch
//!   and confirmation fields.
//! * `schemas`: key = app version; value = the JSON Schema text.
//!
//! Changes are serialized and each is synced to disk before its future resolves.

use std::path::Path;
use std::sync::{Arc, Mutex};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::config::{
    ConfigKey, ConfigStatus, ConfigStore, StatusEvent, StatusFilter, StoredConfig, apply,
    new_config_id,
};
use crate::{BoxFuture, StorageError};

/// The embedded configuration store. Open one per directory.
pub struct EmbeddedConfigStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    configs: Keyspace,
    statuses: Keyspace,
    schemas: Keyspace,
    writer: Mutex<()>,
}

impl std::fmt::Debug for EmbeddedConfigStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedConfigStore").finish_non_exhaustive()
    }
}

impl EmbeddedConfigStore {
    /// Opens (or creates) the store in `path`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let open = |source: Box<dyn std::error::Error + Send + Sync>| StorageError::Open {
            setting: "storage.path",
            source: format!("{}: {source}", path.display()).into(),
        };
        std::fs::create_dir_all(path).map_err(|e| open(e.into()))?;
        let db = Database::builder(path).open().map_err(|e| open(e.into()))?;
        let keyspace = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default).map_err(|e| open(e.into()))
        };
        let (configs, statuses, schemas) =
            (keyspace("configs")?, keyspace("statuses")?, keyspace("schemas")?);
        let inner = Inner { db, configs, statuses, schemas, writer: Mutex::new(()) };
        Ok(Self { inner: Arc::new(inner) })
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StorageError::Task(e.to_string()))?
}

impl ConfigStore for EmbeddedConfigStore {
    fn put(
        &self,
        key: ConfigKey,
        content: Vec<u8>,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<StoredConfig, StorageError>> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || {
            let _w = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            let k = config_key(&key)?;
            let created_ms = match inner.configs.get(&k)? {
                Some(v) => decode_config(key.clone(), &v).ok_or(StorageError::Corrupt)?.created_ms,
                None => now_ms,
            };
            let stored = StoredConfig {
                key,
                config_id: new_config_id(),
                content,
                created_ms,
                updated_ms: now_ms,
            };
            inner.configs.insert(k, encode_config(&stored))?;
            inner.db.persist(PersistMode::SyncAll)?;
            Ok(stored)
        }))
    }

    fn get(&self, key: ConfigKey) -> BoxFuture<'_, Result<Option<StoredConfig>, StorageError>> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || {
            let k = config_key(&key)?;
            match inner.configs.get(&k)? {
                Some(v) => Ok(Some(decode_config(key, &v).ok_or(StorageError::Corrupt)?)),
                None => Ok(None),
            }
        }))
    }

    fn delete(&self, key: ConfigKey) -> BoxFuture<'_, Result<bool, StorageError>> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || {
            let _w = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            let k = config_key(&key)?;
            if inner.configs.get(&k)?.is_none() {
                return Ok(false);
            }
            inner.configs.remove(k)?;
            inner.db.persist(PersistMode::SyncAll)?;
            Ok(true)
        }))
    }

    fn list(
        &self,
        app_version: &str,
        endpoint: Option<&str>,
    ) -> BoxFuture<'_, Result<Vec<StoredConfig>, StorageError>> {
        let inner = self.inner.clone();
        let (app_version, endpoint) = (app_version.to_owned(), endpoint.map(str::to_owned));
        Box::pin(blocking(move || {
            let mut prefix = Vec::new();
            push_str(&mut prefix, &app_version)?;
            prefix.push(u8::from(endpoint.is_some()));
            push_str(&mut prefix, endpoint.as_deref().unwrap_or(""))?;
            let mut out = Vec::new();
            for item in inner.configs.prefix(&prefix) {
                let (k, v) = item.into_inner()?;
                let mut rest = k.get(prefix.len()..).ok_or(StorageError::Corrupt)?;
                let name = take_str(&mut rest).ok_or(StorageError::Corrupt)?;
                let key = ConfigKey {
                    app_version: app_version.clone(),
                    endpoint: endpoint.clone(),
                    name,
                };
                out.push(decode_config(key, &v).ok_or(StorageError::Corrupt)?);
            }
            // Keys sort by length first (length-prefixed); callers get name order.
            out.sort_by(|a, b| a.key.name.cmp(&b.key.name));
            Ok(out)
        }))
    }

    fn set_schema(
        &self,
        app_version: &str,
        schema: Option<Vec<u8>>,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        let inner = self.inner.clone();
        let app_version = app_version.to_owned();
        Box::pin(blocking(move || {
            let _w = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            match schema {
                Some(s) => inner.schemas.insert(app_version.as_bytes(), s)?,
                None => inner.schemas.remove(app_version.as_bytes())?,
            }
            inner.db.persist(PersistMode::SyncAll)?;
            Ok(())
        }))
    }

    fn schema(&self, app_version: &str) -> BoxFuture<'_, Result<Option<Vec<u8>>, StorageError>> {
        let inner = self.inner.clone();
        let app_version = app_version.to_owned();
        Box::pin(blocking(move || {
            Ok(inner.schemas.get(app_version.as_bytes())?.map(|v| v.to_vec()))
        }))
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
        let inner = self.inner.clone();
        let mut status = ConfigStatus {
            app_version: app_version.into(),
            endpoint: endpoint.into(),
            name: name.into(),
            config_id: config_id.into(),
            dispatched_ms: None,
            confirmed_ms: None,
            status_code: None,
            reason: None,
        };
        Box::pin(blocking(move || {
            let _w = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            let k = status_key(&status)?;
            if let Some(v) = inner.statuses.get(&k)? {
                decode_status_fields(&mut status, &v).ok_or(StorageError::Corrupt)?;
            }
            apply(&mut status, event, now_ms);
            inner.statuses.insert(k, encode_status_fields(&status))?;
            inner.db.persist(PersistMode::SyncAll)?;
            Ok(())
        }))
    }

    fn configured_endpoints(
        &self,
        app_version: Option<&str>,
    ) -> BoxFuture<'_, Result<Vec<(String, String)>, StorageError>> {
        let inner = self.inner.clone();
        let app_version = app_version.map(str::to_owned);
        Box::pin(blocking(move || {
            let mut prefix = Vec::new();
            if let Some(a) = &app_version {
                push_str(&mut prefix, a)?;
            }
            let mut out: Vec<(String, String)> = Vec::new();
            for item in inner.configs.prefix(&prefix) {
                let (k, _) = item.into_inner()?;
                // app version, 1 for an endpoint's (0 for a default), endpoint, name.
                let mut rest: &[u8] = &k;
                let version = take_str(&mut rest).ok_or(StorageError::Corrupt)?;
                let (&flag, after) = rest.split_first().ok_or(StorageError::Corrupt)?;
                rest = after;
                if flag == 1 {
                    let endpoint = take_str(&mut rest).ok_or(StorageError::Corrupt)?;
                    out.push((version, endpoint));
                }
            }
            out.sort();
            out.dedup();
            Ok(out)
        }))
    }

    fn statuses(
        &self,
        filter: StatusFilter,
    ) -> BoxFuture<'_, Result<Vec<ConfigStatus>, StorageError>> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || {
            let mut prefix = Vec::new();
            if let Some(a) = &filter.app_version {
                push_str(&mut prefix, a)?;
            }
            let mut out = Vec::new();
            for item in inner.statuses.prefix(&prefix) {
                let (k, v) = item.into_inner()?;
                let mut rest: &[u8] = &k;
                let mut part = || take_str(&mut rest).ok_or(StorageError::Corrupt);
                let mut s = ConfigStatus {
                    app_version: part()?,
                    endpoint: part()?,
                    name: part()?,
                    config_id: part()?,
                    dispatched_ms: None,
                    confirmed_ms: None,
                    status_code: None,
                    reason: None,
                };
                if !filter.matches(&s) {
                    continue;
                }
                decode_status_fields(&mut s, &v).ok_or(StorageError::Corrupt)?;
                out.push(s);
            }
            out.sort_by(|a, b| {
                (&a.app_version, &a.endpoint, &a.name, &a.config_id).cmp(&(
                    &b.app_version,
                    &b.endpoint,
                    &b.name,
                    &b.config_id,
                ))
            });
            Ok(out)
        }))
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) -> Result<(), StorageError> {
    let len = u16::try_from(s.len()).map_err(|_| StorageError::NameTooLong(s.len()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, tail) = (b.get(..n)?, b.get(n..)?);
    *b = tail;
    Some(head)
}

fn take_str(b: &mut &[u8]) -> Option<String> {
    let len = usize::from(u16::from_be_bytes(take(b, 2)?.try_into().ok()?));
    Some(std::str::from_utf8(take(b, len)?).ok()?.to_owned())
}

fn take_i64(b: &mut &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(take(b, 8)?.try_into().ok()?))
}

fn config_key(key: &ConfigKey) -> Result<Vec<u8>, StorageError> {
    let mut k = Vec::with_capacity(7 + key.app_version.len() + key.name.len() + 40);
    push_str(&mut k, &key.app_version)?;
    k.push(u8::from(key.endpoint.is_some()));
    push_str(&mut k, key.endpoint.as_deref().unwrap_or(""))?;
    push_str(&mut k, &key.name)?;
    Ok(k)
}

fn status_key(s: &ConfigStatus) -> Result<Vec<u8>, StorageError> {
    let mut k = Vec::new();
    for part in [&s.app_version, &s.endpoint, &s.name, &s.config_id] {
        push_str(&mut k, part)?;
    }
    Ok(k)
}

/// Configuration id (u16 length, bytes), created and updated (8 bytes each), then the JSON text.
fn encode_config(c: &StoredConfig) -> Vec<u8> {
    let mut out = Vec::with_capacity(18 + c.config_id.len() + c.content.len());
    out.extend_from_slice(&(c.config_id.len() as u16).to_be_bytes());
    out.extend_from_slice(c.config_id.as_bytes());
    out.extend_from_slice(&c.created_ms.to_be_bytes());
    out.extend_from_slice(&c.updated_ms.to_be_bytes());
    out.extend_from_slice(&c.content);
    out
}

fn decode_config(key: ConfigKey, mut b: &[u8]) -> Option<StoredConfig> {
    let config_id = take_str(&mut b)?;
    let created_ms = take_i64(&mut b)?;
    let updated_ms = take_i64(&mut b)?;
    Some(StoredConfig { key, config_id, content: b.to_vec(), created_ms, updated_ms })
}

/// A presence byte (bit 0 dispatched, 1 confirmed, 2 status code, 3 reason), then the
/// present fields in that order (times 8 bytes, code 4 bytes, reason u32 length and bytes).
fn encode_status_fields(s: &ConfigStatus) -> Vec<u8> {
    let mut out = vec![
        u8::from(s.dispatched_ms.is_some())
            | u8::from(s.confirmed_ms.is_some()) << 1
            | u8::from(s.status_code.is_some()) << 2
            | u8::from(s.reason.is_some()) << 3,
    ];
    for t in [s.dispatched_ms, s.confirmed_ms].into_iter().flatten() {
        out.extend_from_slice(&t.to_be_bytes());
    }
    if let Some(c) = s.status_code {
        out.extend_from_slice(&c.to_be_bytes());
    }
    if let Some(r) = &s.reason {
        out.extend_from_slice(&(r.len() as u32).to_be_bytes());
        out.extend_from_slice(r.as_bytes());
    }
    out
}

fn decode_status_fields(s: &mut ConfigStatus, mut b: &[u8]) -> Option<()> {
    let flags = *take(&mut b, 1)?.first()?;
    if flags & 1 != 0 {
        s.dispatched_ms = Some(take_i64(&mut b)?);
    }
    if flags & 2 != 0 {
        s.confirmed_ms = Some(take_i64(&mut b)?);
    }
    if flags & 4 != 0 {
        s.status_code = Some(i32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?));
    }
    if flags & 8 != 0 {
        let len = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
        s.reason = Some(std::str::from_utf8(take(&mut b, len)?).ok()?.to_owned());
    }
    b.is_empty().then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_config_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedConfigStore::open(dir.path()).unwrap();
        crate::config_suite::run(&store).await;
    }

    #[tokio::test]
    async fn configurations_and_statuses_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedConfigStore::open(dir.path()).unwrap();
        let written = crate::config_suite::write_some(&store).await;
        drop(store);
        let store = EmbeddedConfigStore::open(dir.path()).unwrap();
        crate::config_suite::check_some(&store, &written).await;
    }

    #[test]
    fn truncated_status_records_are_refused() {
        let mut s = ConfigStatus {
            app_version: "a".into(),
            endpoint: "e".into(),
            name: "default".into(),
            config_id: "c".into(),
            dispatched_ms: Some(1),
            confirmed_ms: Some(-2),
            status_code: Some(400),
            reason: Some("bad mode".into()),
        };
        let bytes = encode_status_fields(&s);
        let mut back = s.clone();
        back.dispatched_ms = None;
        back.reason = None;
        assert_eq!(decode_status_fields(&mut back, &bytes), Some(()));
        assert_eq!(back, s);
        for cut in 0..bytes.len() {
            assert_eq!(decode_status_fields(&mut s, &bytes[..cut]), None, "cut at {cut}");
        }
    }
}
