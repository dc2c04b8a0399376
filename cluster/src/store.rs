//! The Raft log, vote and committed index, durable in a redb database.
//!
//! Every write of entries, vote or purge point is one redb transaction committed with
//! `Durability::Immediate` (fsync) before openraft is told the IO completed, so an acknowledged
//! entry survives `kill -9`. The committed index is the exception (see `save_committed`). Writes run on
//! the blocking pool: an fsync must not stall an async worker. Entries are stored as JSON.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogId, RaftLogReader, Vote};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{NodeId, StorageError, TypeConfig, io_error};

type Entry = openraft::Entry<TypeConfig>;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// The log store. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// Committed index + 1 (0: none), as last saved, for status reports.
    committed: Arc<AtomicU64>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

fn logs_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    io_error(ErrorSubject::Logs, verb, e)
}

impl LogStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let db = Database::create(path).map_err(|e| logs_err(ErrorVerb::Read, e))?;
        Self::on(db)
    }

    /// Opens (or creates) the store on a storage backend of redb's other than a file (a disk
    /// that keeps only what was synced, to test what survives a crash).
    pub fn open_on(backend: impl redb::StorageBackend) -> Result<Self, StorageError> {
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(|e| logs_err(ErrorVerb::Read, e))?;
        Self::on(db)
    }

    fn on(db: Database) -> Result<Self, StorageError> {
        // Tables must exist before the first read transaction opens them.
        let tx = db
            .begin_write()
            .map_err(|e| logs_err(ErrorVerb::Write, e))?;
        tx.open_table(LOGS)
            .map_err(|e| logs_err(ErrorVerb::Write, e))?;
        tx.open_table(META)
            .map_err(|e| logs_err(ErrorVerb::Write, e))?;
        tx.commit().map_err(|e| logs_err(ErrorVerb::Write, e))?;
        let store = Self {
            db: Arc::new(db),
            committed: Arc::new(AtomicU64::new(0)),
        };
        let committed: Option<LogId<NodeId>> = store.read_meta::<Option<_>>(COMMITTED)?.flatten();
        store
            .committed
            .store(committed.map_or(0, |l| l.index + 1), Ordering::Relaxed);
        Ok(store)
    }

    /// The committed index as this store last saved it, plus one (0: nothing committed).
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.committed)
    }

    /// Runs `f` in a read transaction; every failure is reported as a log read error.
    fn read<R>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<R, Box<dyn std::error::Error>>,
    ) -> Result<R, StorageError> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| logs_err(ErrorVerb::Read, e))?;
        f(&tx).map_err(|e| logs_err(ErrorVerb::Read, e))
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        self.read(|tx| {
            let table = tx.open_table(META)?;
            let Some(v) = table.get(key)? else {
                return Ok(None);
            };
            Ok(Some(serde_json::from_slice(v.value())?))
        })
    }

    /// Runs one write transaction on the blocking pool and commits it durably.
    async fn write<F>(&self, f: F) -> Result<(), StorageError>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    {
        self.write_with(Durability::Immediate, f).await
    }

    /// As [`LogStore::write`]; with [`Durability::None`] the write reaches the disk with the
    /// next durable one.
    async fn write_with<F>(&self, durability: Durability, f: F) -> Result<(), StorageError>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || {
            let mut tx = db.begin_write()?;
            tx.set_durability(durability)?;
            f(&tx)?;
            tx.commit()?;
            Ok::<_, redb::Error>(())
        })
        .await
        .map_err(|e| logs_err(ErrorVerb::Write, e))?
        .map_err(|e| logs_err(ErrorVerb::Write, e))
    }

    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        value: &T,
    ) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(|e| logs_err(ErrorVerb::Write, e))?;
        self.write(move |tx| {
            tx.open_table(META)?.insert(key, bytes.as_slice())?;
            Ok(())
        })
        .await
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read(|tx| {
            let table = tx.open_table(LOGS)?;
            let mut out = Vec::new();
            for item in table.range::<u64>(bounds(&range))? {
                let (_, v) = item?;
                out.push(serde_json::from_slice(v.value())?);
            }
            Ok(out)
        })
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId<NodeId>> = self.read_meta(LAST_PURGED)?;
        let last = self.read(|tx| {
            let table = tx.open_table(LOGS)?;
            Ok(match table.last()? {
                Some((_, v)) => Some(serde_json::from_slice::<Entry>(v.value())?.log_id),
                None => None,
            })
        })?;
        let last = last.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.write_meta(VOTE, vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.read_meta(VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        // Not fsynced on its own: openraft can always re-learn the commit index, so it rides
        // along with the next durable write instead of costing a disk flush per commit.
        let bytes = serde_json::to_vec(&committed).map_err(|e| logs_err(ErrorVerb::Write, e))?;
        self.write_with(Durability::None, move |tx| {
            tx.open_table(META)?.insert(COMMITTED, bytes.as_slice())?;
            Ok(())
        })
        .await?;
        self.committed
            .store(committed.map_or(0, |l| l.index + 1), Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self
            .read_meta::<Option<LogId<NodeId>>>(COMMITTED)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let encoded = entries
            .into_iter()
            .map(|e| serde_json::to_vec(&e).map(|b| (e.log_id.index, b)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| logs_err(ErrorVerb::Write, e))?;
        let result = self
            .write(move |tx| {
                let mut table = tx.open_table(LOGS)?;
                for (index, bytes) in &encoded {
                    table.insert(*index, bytes.as_slice())?;
                }
                Ok(())
            })
            .await;
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        self.write(move |tx| {
            tx.open_table(LOGS)?
                .retain_in(log_id.index.., |_, _| false)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&log_id).map_err(|e| logs_err(ErrorVerb::Write, e))?;
        self.write(move |tx| {
            tx.open_table(META)?.insert(LAST_PURGED, bytes.as_slice())?;
            tx.open_table(LOGS)?
                .retain_in(..=log_id.index, |_, _| false)?;
            Ok(())
        })
        .await
    }
}
