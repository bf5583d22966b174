//! The store-and-forward spool: requests the gateway acknowledged while the bus could not take
//! them, on disk until they are delivered.
//!
//! An ordered, bounded queue of `(subject, ClientData)` records in an embedded fjall database
//! under `gateway.spool.path`, keyed by a sequence number, so that records come back in the
//! order they went in, also after a restart. [`Spool::append`] resolves once the record is
//! fsynced: only then may the device hear an acknowledgement. Appends that arrive together
//! share one fsync (a group commit on a thread of its own), so a spool in use costs one fsync
//! per batch, not per message. A record is removed once its extension answered; a crash before
//! the removal is synced replays it (at least once, never lost).
//!
//! It knows nothing of the bus or of sessions: what to do with a record is the forwarder's
//! business ([`crate::delivery`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::watch;

/// Why the spool refused or failed. A full spool is the backend's fault (it has been away too
/// long); the others are the disk's or the operator's.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool holds `max_bytes` already.
    #[error("the spool is full ({bytes} of {max} bytes)")]
    Full {
        /// Bytes it holds.
        bytes: u64,
        /// Its limit.
        max: u64,
    },
    /// The directory cannot be created or opened (permissions, another process holds it).
    #[error("gateway.spool.path: cannot open the spool at {}", path.display())]
    Open {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The embedded store failed to write or sync: the disk is full or failing.
    #[error("the spool cannot write to disk")]
    Store(#[from] fjall::Error),
    /// A record on disk that is not one this version writes (corruption, or a newer version).
    #[error("spool record {0} is unreadable")]
    Corrupt(u64),
    /// The spool was closed (the process is stopping).
    #[error("the spool is closed")]
    Closed,
}

/// One spooled request: where it goes and what, as the gateway encoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When it was spooled, ms since the epoch.
    pub spooled_ms: i64,
    /// The extension's `ClientData` subject.
    pub subject: String,
    /// The encoded 4/ESP `ClientData`.
    pub client_data: Bytes,
}

/// The first byte of every record: its format.
const FORMAT: u8 = 1;

impl Record {
    fn encode(&self) -> Vec<u8> {
        let subject = self.subject.as_bytes();
        let mut out = Vec::with_capacity(11 + subject.len() + self.client_data.len());
        out.push(FORMAT);
        out.extend_from_slice(&self.spooled_ms.to_be_bytes());
        // Subjects are short: a NATS subject over 64 KiB is refused long before here.
        let len = u16::try_from(subject.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&subject[..usize::from(len)]);
        out.extend_from_slice(&self.client_data);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (&format, rest) = bytes.split_first()?;
        if format != FORMAT || rest.len() < 10 {
            return None;
        }
        let spooled_ms = i64::from_be_bytes(rest[..8].try_into().ok()?);
        let len = usize::from(u16::from_be_bytes(rest[8..10].try_into().ok()?));
        let rest = &rest[10..];
        let subject = std::str::from_utf8(rest.get(..len)?).ok()?.to_owned();
        let client_data = Bytes::copy_from_slice(&rest[len..]);
        Some(Self { spooled_ms, subject, client_data })
    }
}

/// What the spool holds, kept in memory (the disk is read only to replay records).
#[derive(Debug, Default)]
struct Tail {
    /// The sequence number of the next record.
    next_seq: u64,
    /// Records held, and their bytes on disk (as encoded).
    count: u64,
    bytes: u64,
    /// The highest sequence number written (not necessarily synced).
    written: u64,
    /// Set when the spool closes: the syncing thread ends.
    closed: bool,
}

/// The spool. Cheap to share (`Arc`); all methods take `&self`.
pub struct Spool {
    items: Keyspace,
    max_bytes: u64,
    tail: Mutex<Tail>,
    /// Wakes the syncing thread.
    sync_wanted: std::sync::Condvar,
    /// The highest sequence number known to be on disk.
    synced: watch::Sender<u64>,
    /// Size of each record on disk, by sequence number, for `bytes` when it is removed.
    sizes: Mutex<std::collections::BTreeMap<u64, (u64, i64)>>,
    db: Database,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("max_bytes", &self.max_bytes).finish_non_exhaustive()
    }
}

impl Spool {
    /// Opens (or creates) the spool at `path`, holding at most `max_bytes`, with what an
    /// earlier process left in it. Starts the syncing thread.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Arc<Self>, SpoolError> {
        let open_error = |source: Box<dyn std::error::Error + Send + Sync>| SpoolError::Open {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(|e| open_error(e.into()))?;
        let db = Database::builder(path).open().map_err(|e| open_error(e.into()))?;
        let items = db
            .keyspace("requests", KeyspaceCreateOptions::default)
            .map_err(|e| open_error(e.into()))?;
        let mut tail = Tail::default();
        let mut sizes = std::collections::BTreeMap::new();
        for item in items.iter() {
            let (key, value) = item.into_inner()?;
            let Some(seq) = seq_of(&key) else { continue };
            let spooled_ms = Record::decode(&value).map_or(0, |r| r.spooled_ms);
            tail.count += 1;
            tail.bytes += value.len() as u64;
            tail.next_seq = tail.next_seq.max(seq + 1);
            sizes.insert(seq, (value.len() as u64, spooled_ms));
        }
        tail.written = tail.next_seq.saturating_sub(1);
        let (synced, _) = watch::channel(tail.written);
        let spool = Arc::new(Self {
            items,
            max_bytes,
            tail: Mutex::new(tail),
            sync_wanted: std::sync::Condvar::new(),
            synced,
            sizes: Mutex::new(sizes),
            db,
        });
        let syncer = Arc::downgrade(&spool);
        std::thread::Builder::new()
            .name("fleetgate-spool-sync".into())
            .spawn(move || sync_loop(&syncer))
            .map_err(|e| open_error(e.into()))?;
        Ok(spool)
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `record` and resolves with its sequence number once it is on disk. Refused with
    /// [`SpoolError::Full`] when it would take the spool over its limit. `numbered` gets the
    /// sequence number before the record can be read back (so that whoever settles the record
    /// finds what it needs), and again with `None` if the write then fails.
    pub async fn append(
        &self,
        record: &Record,
        mut numbered: impl FnMut(u64, bool),
    ) -> Result<u64, SpoolError> {
        let value = record.encode();
        let size = value.len() as u64;
        let seq = {
            // Written under the lock, so that every sequence number up to `written` is in the
            // journal when the syncing thread reads it.
            let mut tail = self.tail();
            if tail.closed {
                return Err(SpoolError::Closed);
            }
            if tail.bytes + size > self.max_bytes && tail.count > 0 {
                return Err(SpoolError::Full { bytes: tail.bytes, max: self.max_bytes });
            }
            let seq = tail.next_seq;
            numbered(seq, true);
            if let Err(e) = self.items.insert(seq.to_be_bytes(), value) {
                numbered(seq, false);
                return Err(e.into());
            }
            tail.next_seq += 1;
            tail.count += 1;
            tail.bytes += size;
            tail.written = seq;
            self.sizes_lock().insert(seq, (size, record.spooled_ms));
            seq
        };
        self.sync_wanted.notify_one();
        let mut synced = self.synced.subscribe();
        synced.wait_for(|s| *s >= seq).await.map_err(|_| SpoolError::Closed)?;
        Ok(seq)
    }

    fn sizes_lock(&self) -> MutexGuard<'_, std::collections::BTreeMap<u64, (u64, i64)>> {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Up to `max` records after sequence number `after` (`None`: from the oldest), in order.
    pub fn read_after(
        &self,
        after: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u64, Record)>, SpoolError> {
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::new();
        for item in self.items.range(start.to_be_bytes()..).take(max) {
            let (key, value) = item.into_inner()?;
            let Some(seq) = seq_of(&key) else { continue };
            let record = Record::decode(&value).ok_or(SpoolError::Corrupt(seq))?;
            out.push((seq, record));
        }
        Ok(out)
    }

    /// Forgets record `seq` (delivered). Not synced at once: a crash before the next sync
    /// replays it, which delivers it twice rather than never.
    pub fn remove(&self, seq: u64) -> Result<(), SpoolError> {
        let Some((size, _)) = self.sizes_lock().remove(&seq) else { return Ok(()) };
        self.items.remove(seq.to_be_bytes())?;
        let mut tail = self.tail();
        tail.count = tail.count.saturating_sub(1);
        tail.bytes = tail.bytes.saturating_sub(size);
        Ok(())
    }

    /// Records held.
    pub fn len(&self) -> u64 {
        self.tail().count
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held (as encoded).
    pub fn bytes(&self) -> u64 {
        self.tail().bytes
    }

    /// Whether another record of `size` bytes would not fit: the gateway is not ready.
    pub fn is_full(&self, size: u64) -> bool {
        let tail = self.tail();
        tail.count > 0 && tail.bytes + size > self.max_bytes
    }

    /// The sequence number of the newest record.
    pub fn newest(&self) -> Option<u64> {
        self.sizes_lock().last_key_value().map(|(seq, _)| *seq)
    }

    /// When the oldest record was spooled, ms since the epoch.
    pub fn oldest_ms(&self) -> Option<i64> {
        self.sizes_lock().first_key_value().map(|(_, (_, ms))| *ms)
    }

    /// Syncs what was written and removed, and stops the syncing thread. Later appends fail.
    pub fn close(&self) -> Result<(), SpoolError> {
        self.tail().closed = true;
        self.sync_wanted.notify_one();
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }
}

/// The sequence number in a key.
fn seq_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Syncs the journal whenever records were written since the last sync, and tells the
/// appenders waiting for it: one fsync for every append that came meanwhile.
fn sync_loop(spool: &std::sync::Weak<Spool>) {
    let mut synced = 0;
    loop {
        let Some(spool) = spool.upgrade() else { return };
        let (target, closed) = {
            let mut tail = spool.tail();
            while tail.written <= synced && !tail.closed {
                let (guard, _) = spool
                    .sync_wanted
                    .wait_timeout(tail, std::time::Duration::from_millis(200))
                    .unwrap_or_else(|p| p.into_inner());
                tail = guard;
                if Arc::strong_count(&spool) == 1 {
                    return;
                }
            }
            (tail.written, tail.closed)
        };
        if target > synced {
            match spool.db.persist(PersistMode::SyncAll) {
                Ok(()) => {
                    synced = target;
                    spool.synced.send_replace(target);
                }
                Err(e) => {
                    // Appenders keep waiting (their requests are not acknowledged) and the
                    // next append tries again.
                    tracing::error!(error = %e, "the spool cannot sync to disk");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(n: u8) -> Record {
        Record {
            spooled_ms: 1_700_000_000_000 + i64::from(n),
            subject: "kaa.v1.service.dcx.esp.ClientData".into(),
            client_data: Bytes::from(vec![n; 100]),
        }
    }

    #[test]
    fn records_round_trip() {
        let r = record(3);
        assert_eq!(Record::decode(&r.encode()), Some(r));
        assert_eq!(Record::decode(b""), None);
        assert_eq!(Record::decode(&[2, 0, 0]), None);
    }

    #[tokio::test]
    async fn records_come_back_in_order_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 20).unwrap();
            for n in 0..5 {
                assert_eq!(spool.append(&record(n), |_, _| {}).await.unwrap(), u64::from(n));
            }
            spool.remove(1).unwrap();
            assert_eq!(spool.len(), 4);
            let got: Vec<u64> =
                spool.read_after(None, 10).unwrap().into_iter().map(|(s, _)| s).collect();
            assert_eq!(got, [0, 2, 3, 4]);
            assert_eq!(spool.read_after(Some(2), 1).unwrap()[0], (3, record(3)));
            spool.close().unwrap();
        }
        // A new process finds what was appended (and the removal, which the close synced),
        // once the syncing thread of the first has let go of the directory.
        let spool = reopen(dir.path());
        assert_eq!(spool.len(), 4);
        assert_eq!(spool.oldest_ms(), Some(record(0).spooled_ms));
        let all = spool.read_after(None, 10).unwrap();
        assert_eq!(all.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [0, 2, 3, 4]);
        assert_eq!(all[3].1, record(4));
        // New records go after the old ones.
        assert_eq!(spool.append(&record(9), |_, _| {}).await.unwrap(), 5);
    }

    fn reopen(path: &Path) -> Arc<Spool> {
        for _ in 0..50 {
            if let Ok(spool) = Spool::open(path, 1 << 20) {
                return spool;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Spool::open(path, 1 << 20).unwrap()
    }

    #[tokio::test]
    async fn a_full_spool_refuses_and_takes_again_after_removals() {
        let dir = tempfile::tempdir().unwrap();
        let size = record(0).encode().len() as u64;
        let spool = Spool::open(dir.path(), 3 * size).unwrap();
        for n in 0..3 {
            spool.append(&record(n), |_, _| {}).await.unwrap();
        }
        assert!(spool.is_full(size));
        assert!(matches!(spool.append(&record(3), |_, _| {}).await, Err(SpoolError::Full { .. })));
        spool.remove(0).unwrap();
        assert!(!spool.is_full(size));
        assert_eq!(spool.append(&record(3), |_, _| {}).await.unwrap(), 3);
        assert_eq!(spool.bytes(), 3 * size);
    }

    #[tokio::test]
    async fn concurrent_appends_share_syncs_and_all_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let tasks: Vec<_> = (0..200u8)
            .map(|n| {
                let spool = spool.clone();
                tokio::spawn(async move { spool.append(&record(n), |_, _| {}).await.unwrap() })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (0..200).collect::<Vec<u64>>());
        assert_eq!(spool.len(), 200);
    }

    #[test]
    fn a_second_process_cannot_open_the_same_spool() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Spool::open(dir.path(), 1 << 20).unwrap();
        let second = Spool::open(dir.path(), 1 << 20);
        assert!(matches!(second, Err(SpoolError::Open { .. })), "{second:?}");
    }
}
