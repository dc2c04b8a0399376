//! The per-call log: every request's [`CallEntry`], kept in SQLite in the node's data directory
//! (`calls.sqlite`, table `calls`), written in batches by a thread of its own so that a request
//! never waits on the disk.
//!
//! A request hands its entry to a bounded queue and goes on. The writer takes what has queued
//! (up to [`BATCH`] entries, or what came within [`LINGER`]) and commits it in one transaction;
//! the database runs in WAL mode, so a committed batch survives the process being killed. What
//! a `kill -9` loses is what was queued and not yet committed: at most the requests of the last
//! [`LINGER`] plus one batch being written. A full queue (the disk cannot keep up) drops entries
//! and counts them, never blocks. Rows older than the retention are deleted once an hour.
//!
//! One index (by time): each insert pays for every index, and the questions asked of the log
//! are about recent calls. A row costs the writer thread about 20,000 instructions (measured
//! with callgrind, release build).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use meridian_actors::calllog::{CallEntry, CallLog};
use rusqlite::{Connection, params};

/// Most entries committed in one transaction.
pub const BATCH: usize = 512;
/// Longest an entry waits in the queue for more to come before it is written.
pub const LINGER: Duration = Duration::from_millis(100);
/// Entries the queue holds before new ones are dropped.
const QUEUE: usize = 65_536;

/// The file in the data directory.
pub const FILE: &str = "calls.sqlite";

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS calls (
    time_unix_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    node INTEGER NOT NULL,
    region TEXT NOT NULL,
    edge TEXT NOT NULL,
    api TEXT NOT NULL,
    tenant TEXT,
    key_id TEXT,
    user TEXT,
    feature TEXT,
    model TEXT NOT NULL,
    served_model TEXT,
    provider TEXT,
    attempts INTEGER NOT NULL,
    code TEXT NOT NULL,
    input_tokens INTEGER,
    output_tokens INTEGER,
    cached_tokens INTEGER,
    reasoning_tokens INTEGER,
    ttft_ms REAL,
    duration_ms REAL NOT NULL,
    queue_wait_ms REAL,
    cost_micro_usd INTEGER NOT NULL,
    cost_usd REAL GENERATED ALWAYS AS (cost_micro_usd / 1000000.0) VIRTUAL,
    cache_hit INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    cancelled INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_time ON calls (time_unix_ms);
";

/// Why the per-call log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CallsError {
    #[error("the per-call log {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the per-call log's writer thread: {0}")]
    Thread(std::io::Error),
}

/// Where this node's rows say they came from.
#[derive(Debug, Clone)]
pub struct Origin {
    pub node: u64,
    pub region: String,
}

/// The SQLite per-call log of a node.
#[derive(Debug)]
pub struct SqliteCalls {
    queue: Mutex<Option<SyncSender<CallEntry>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<CallStats>,
}

/// What the log did, for metrics.
#[derive(Debug, Default)]
pub struct CallStats {
    pub written: AtomicU64,
    /// Dropped: the queue was full, or a batch could not be written.
    pub dropped: AtomicU64,
}

impl SqliteCalls {
    /// Opens (or creates) `<data_dir>/calls.sqlite` and starts its writer; rows are kept for
    /// `retention`.
    pub fn open(data_dir: &Path, origin: Origin, retention: Duration) -> Result<Self, CallsError> {
        let path = data_dir.join(FILE);
        let open = |path: &Path| -> rusqlite::Result<Connection> {
            let db = Connection::open(path)?;
            db.execute_batch(SCHEMA)?;
            Ok(db)
        };
        let db = open(&path).map_err(|source| CallsError::Open {
            path: path.clone(),
            source,
        })?;
        let (queue, entries) = sync_channel(QUEUE);
        let stats = Arc::new(CallStats::default());
        let writer = Writer {
            db,
            origin,
            retention,
            stats: Arc::clone(&stats),
        };
        let writer = std::thread::Builder::new()
            .name("call-log".into())
            .spawn(move || writer.run(entries))
            .map_err(CallsError::Thread)?;
        Ok(Self {
            queue: Mutex::new(Some(queue)),
            writer: Mutex::new(Some(writer)),
            stats,
        })
    }

    pub fn stats(&self) -> &CallStats {
        &self.stats
    }

    /// Stops taking entries and waits (at most `within`) for those queued to be written.
    pub fn close(&self, within: Duration) {
        drop(lock(&self.queue).take());
        let Some(writer) = lock(&self.writer).take() else {
            return;
        };
        let deadline = Instant::now() + within;
        while !writer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if writer.is_finished() {
            let _ = writer.join();
        } else {
            tracing::warn!("the per-call log did not finish writing in {within:?}");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl CallLog for SqliteCalls {
    fn write(&self, entry: CallEntry) {
        let sent = match &*lock(&self.queue) {
            Some(queue) => queue.try_send(entry),
            None => Err(TrySendError::Disconnected(entry)),
        };
        if sent.is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Writer {
    db: Connection,
    origin: Origin,
    retention: Duration,
    stats: Arc<CallStats>,
}

impl Writer {
    fn run(mut self, entries: Receiver<CallEntry>) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut last_prune: Option<Instant> = None;
        loop {
            // Wait for one entry, then take what comes within LINGER.
            let first = match entries.recv_timeout(Duration::from_secs(60)) {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout) => {
                    self.prune(&mut last_prune);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            batch.push(first);
            let until = Instant::now() + LINGER;
            let mut open = true;
            while batch.len() < BATCH {
                match entries.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(e) => batch.push(e),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.commit(&mut batch);
            self.prune(&mut last_prune);
            if !open {
                // Closing: what is left in the queue is written before the thread ends.
                while let Ok(e) = entries.try_recv() {
                    batch.push(e);
                    if batch.len() == BATCH {
                        self.commit(&mut batch);
                    }
                }
                self.commit(&mut batch);
                return;
            }
        }
    }

    fn commit(&mut self, batch: &mut Vec<CallEntry>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        match insert(&mut self.db, &self.origin, batch) {
            Ok(()) => {
                self.stats.written.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::error!(error = %e, records = n, "per-call records could not be written");
            }
        }
        batch.clear();
    }

    /// Deletes rows past the retention, at most once an hour.
    fn prune(&mut self, last: &mut Option<Instant>) {
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(3600)) {
            return;
        }
        *last = Some(Instant::now());
        let cutoff = meridian_policy::clock::unix_ms()
            .saturating_sub(self.retention.as_millis() as u64) as i64;
        if let Err(e) = self
            .db
            .execute("DELETE FROM calls WHERE time_unix_ms < ?1", [cutoff])
        {
            tracing::warn!(error = %e, "old per-call records could not be deleted");
        }
    }
}

fn insert(db: &mut Connection, origin: &Origin, batch: &[CallEntry]) -> rusqlite::Result<()> {
    let tx = db.transaction()?;
    {
        let mut row = tx.prepare_cached(
            "INSERT INTO calls (time_unix_ms, request_id, node, region, edge, api, tenant, key_id,
                user, feature, model, served_model, provider, attempts, code, input_tokens,
                output_tokens, cached_tokens, reasoning_tokens, ttft_ms, duration_ms,
                queue_wait_ms, cost_micro_usd, cache_hit, stream, cancelled)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                ?18, NULL, ?19, ?20, ?21, ?22, ?23, ?24, ?25)",
        )?;
        for e in batch {
            let tokens = e.tokens;
            row.execute(params![
                e.at_unix_ms as i64,
                e.request_id.as_str(),
                origin.node as i64,
                origin.region,
                e.edge.as_str(),
                e.api,
                e.tenant.as_deref(),
                e.key_id.as_deref(),
                e.user.as_deref(),
                e.feature.as_deref(),
                &*e.model,
                e.served_model.as_deref(),
                e.provider.as_deref(),
                e.attempts,
                &*e.code,
                tokens.map(|t| t.input as i64),
                tokens.map(|t| t.output as i64),
                tokens.map(|t| t.cached_input as i64),
                e.ttft_ms,
                e.duration_ms,
                e.queue_wait_ms,
                e.cost_micro_usd as i64,
                e.cache_hit,
                e.stream,
                e.cancelled,
            ])?;
        }
    }
    tx.commit()
}

/// The newest `last` calls in the log at `path` (of `tenant` only, if given), newest first.
pub fn newest(
    path: &Path,
    tenant: Option<&str>,
    last: u32,
) -> rusqlite::Result<Vec<meridian_proto::pb::admin::CallRecord>> {
    let db = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut query = db.prepare(
        "SELECT time_unix_ms, request_id, node, edge, tenant, key_id, user, feature, model,
            served_model, provider, attempts, code, input_tokens, output_tokens, cached_tokens,
            ttft_ms, duration_ms, queue_wait_ms, cost_micro_usd, cache_hit, stream, cancelled
         FROM calls WHERE ?1 IS NULL OR tenant = ?1
         ORDER BY time_unix_ms DESC LIMIT ?2",
    )?;
    let text = |row: &rusqlite::Row<'_>, i: usize| -> rusqlite::Result<String> {
        Ok(row.get::<_, Option<String>>(i)?.unwrap_or_default())
    };
    let count = |row: &rusqlite::Row<'_>, i: usize| -> rusqlite::Result<u64> {
        Ok(row.get::<_, Option<i64>>(i)?.unwrap_or(0).max(0) as u64)
    };
    let rows = query.query_map(params![tenant, last], |row| {
        Ok(meridian_proto::pb::admin::CallRecord {
            time_unix_ms: count(row, 0)?,
            request_id: text(row, 1)?,
            node: count(row, 2)?,
            edge: text(row, 3)?,
            tenant: text(row, 4)?,
            key_id: text(row, 5)?,
            user: text(row, 6)?,
            feature: text(row, 7)?,
            model: text(row, 8)?,
            served_model: text(row, 9)?,
            provider: text(row, 10)?,
            attempts: count(row, 11)? as u32,
            code: text(row, 12)?,
            input_tokens: count(row, 13)?,
            output_tokens: count(row, 14)?,
            cached_tokens: count(row, 15)?,
            ttft_ms: row.get::<_, Option<f64>>(16)?.unwrap_or(0.0),
            duration_ms: row.get(17)?,
            queue_wait_ms: row.get::<_, Option<f64>>(18)?.unwrap_or(0.0),
            cost_micro_usd: count(row, 19)?,
            cache_hit: row.get(20)?,
            stream: row.get(21)?,
            cancelled: row.get(22)?,
        })
    })?;
    rows.collect()
}
