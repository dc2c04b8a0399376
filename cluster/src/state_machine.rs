//! The Raft state machine: applies [`Proposal`]s to a [`ClusterState`], publishes every applied
//! state on a `watch` (the hot path reads that, never Raft), and keeps its current snapshot in
//! `snapshot.bin` in the data directory (a MessagePack body, compressed with zstd once every
//! member reads that), replaced atomically (write, fsync, rename, fsync dir).
//!
//! The state itself lives in memory: on restart it comes back from the snapshot, and openraft
//! re-applies the committed log entries after it.
//!
//! Two copies, as in a left-right map. The published version is immutable (readers hold it
//! as long as they like), so applying to it would copy every changed path of its persistent
//! tables, and publishing a clone of a working copy would make the next apply copy them again:
//! copying a B-tree node takes a reference on each of its entries, and dropping the replaced
//! version releases them, one cache miss each. Instead the state machine keeps a spare copy,
//! the version published before the current one, and the entries applied since (`lag`). An
//! apply first replays `lag` onto the spare, then applies its entries, publishes the spare and
//! takes the replaced version back as the next spare. Where no reader holds a node of the
//! spare, both steps change it in place: no copy, no allocation, nothing to drop. Apply is
//! deterministic (it reads only the proposal and the state), so the replay makes the spare equal
//! to what was published. A replaced version that a reader still holds (an admin read, a metrics
//! scrape) is left to it (and freed here, off its thread, once it lets go); the spare is then a
//! clone of the published version, which shares its nodes, and applies copy paths as a single
//! copy would until the copies part again. A snapshot being written shares the nodes of the
//! version it was taken from in the same way, until it is written.
//! So that the state is not held twice for good, the copies also join that way every
//! [`REJOIN_AFTER`], and after a bulk write ([`BULK`]).

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meridian_proto::cluster::{Applied, ClusterState, NodeId, Proposal};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, SnapshotMeta,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::{StorageError, TypeConfig, io_error};

type Entry = openraft::Entry<TypeConfig>;
type Meta = SnapshotMeta<NodeId, BasicNode>;
type Membership = StoredMembership<NodeId, BasicNode>;

/// The snapshot file: its meta as JSON (length-prefixed), then the body's bytes as they are.
const SNAPSHOT_FILE: &str = "snapshot.bin";
/// The file of earlier versions (meta and body in one JSON document), read if no
/// [`SNAPSHOT_FILE`] exists yet; replaced by it at the next snapshot.
const OLD_SNAPSHOT_FILE: &str = "snapshot.json";

/// The newest snapshot form this version reads, recorded in its member record
/// ([`meridian_proto::cluster::Member::snapshot_format`]):
/// - 0: MessagePack (and the JSON bodies of earlier versions);
/// - 1: the same MessagePack compressed with zstd (a zstd frame, told apart by its magic number).
///
/// A snapshot is written in form 1 only when every node of the Raft membership has recorded that
/// it reads it, so that a later form can be introduced without a leader sending a member a
/// snapshot it cannot install. A node added to a cluster whose snapshots are compressed must run
/// a version that reads them.
///
/// Versions before this one read no snapshot this one writes, compressed or not: the member
/// record gained this field, and a MessagePack body holds structs as arrays, which an earlier
/// reader refuses when they are longer than it knows (as with every field added to a replicated
/// record). So one node cannot be rolled back past this version: an earlier version reads
/// neither its own data directory nor, emptied, the leader's snapshot. Rolling back means the
/// whole cluster at once, on the data directories kept from before the upgrade. In a rolling
/// upgrade followers go first (as the README says), so that no follower of an earlier version
/// needs a snapshot from an upgraded leader; a follower's record that an earlier leader wrote
/// without this field is proposed again until a leader of this version records it whole.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// zstd's level 1. On the state bench's state (`benches/state.rs`) 61.2 MB of MessagePack became
/// 24.7 MB in 0.32 s, encoding and writing included (level 3: 23.6 MB in 0.49 s). API keys'
/// random digests do not shrink; the names and figures around them do.
const ZSTD_LEVEL: i32 = 1;
/// How long the two copies of the state go on apart (see the module's doc) before the spare is
/// made a clone of the published version again. Apart, the copies each hold their own copy of
/// every node either changed; joined, they share all of them again. What is written all the
/// time (the ledger, today's roll-ups) parts again within seconds whatever the period; what
/// the period bounds is the rest, written once and then only read (a day's roll-ups once the
/// day is over, tenants and keys an operator changed), which would otherwise stay held twice.
/// The applies just after a join pay for copying what they change in both copies, about twice
/// what a single copy paid (the state bench prints them): once in ten minutes, they are a few
/// dozen of the tens of thousands of applies a busy node makes in that time.
pub const REJOIN_AFTER: Duration = Duration::from_secs(600);
/// An apply of this many commands or more (a bulk write, a catch-up) joins the copies at once:
/// replaying it onto the spare would cost as much again, and would make the copies each hold
/// their own copy of all it wrote, where a clone costs nothing. No usage flush is that large
/// (at most 512 KiB, some 6,000 reports).
const BULK: usize = 10_000;
/// How many replaced versions readers still hold the state machine keeps to free itself; one
/// more lets go of the oldest (its last reader then frees it).
const RETIRED: usize = 16;
/// A zstd frame's first bytes (RFC 8878, 3.1.1).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// A snapshot body as MessagePack (structs as arrays: compact; a field added later with a
/// default reads as its default from an older body), compressed if `compress`. Bodies from
/// earlier versions are JSON.
fn encode_body(body: &SnapshotBody, compress: bool) -> Result<Vec<u8>, SnapshotFileError> {
    if !compress {
        return Ok(rmp_serde::to_vec(body)?);
    }
    let encoder = zstd::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
    // MessagePack is written a field at a time: buffered, the compressor sees large writes.
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, encoder);
    rmp_serde::encode::write(&mut out, body)?;
    let encoder = out.into_inner().map_err(|e| e.into_error())?;
    Ok(encoder.finish()?)
}

fn decode_body(bytes: &[u8]) -> Result<SnapshotBody, SnapshotFileError> {
    if bytes.first() == Some(&b'{') {
        return Ok(serde_json::from_slice(bytes)?);
    }
    if bytes.starts_with(&ZSTD_MAGIC) {
        return Ok(rmp_serde::from_slice(&zstd::decode_all(bytes)?)?);
    }
    Ok(rmp_serde::from_slice(bytes)?)
}

/// Why a snapshot file or body cannot be read.
#[derive(Debug, thiserror::Error)]
enum SnapshotFileError {
    #[error("snapshot file too short")]
    TooShort,
    #[error("snapshot meta cut short")]
    MetaCut,
    #[error("snapshot JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("snapshot MessagePack: {0}")]
    MessagePack(#[from] rmp_serde::decode::Error),
    #[error("snapshot MessagePack: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `meta` and `data` as the snapshot file holds them.
fn file_bytes(meta: &Meta, data: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let meta = serde_json::to_vec(meta)?;
    let mut out = Vec::with_capacity(8 + meta.len() + data.len());
    out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(data);
    Ok(out)
}

/// The meta and data of a snapshot file (either format).
fn read_file(dir: &Path) -> Result<Option<(Meta, Vec<u8>)>, SnapshotFileError> {
    match std::fs::read(dir.join(SNAPSHOT_FILE)) {
        Ok(bytes) => {
            let (len, rest) = bytes
                .split_first_chunk::<8>()
                .ok_or(SnapshotFileError::TooShort)?;
            let (meta, data) = rest
                .split_at_checked(u64::from_le_bytes(*len) as usize)
                .ok_or(SnapshotFileError::MetaCut)?;
            return Ok(Some((serde_json::from_slice(meta)?, data.to_vec())));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::read(dir.join(OLD_SNAPSHOT_FILE)) {
        Ok(bytes) => {
            let file: SnapshotFile = serde_json::from_slice(&bytes)?;
            Ok(Some((file.meta, file.data)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// What a snapshot's bytes hold.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId<NodeId>>,
    last_membership: Membership,
    state: ClusterState,
}

/// The file of earlier versions: the snapshot's meta and its bytes.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: Meta,
    data: Vec<u8>,
}

struct Inner {
    /// The version published before the current one, unless it was still held when replaced
    /// (then a clone of the current one); `lag` brings it up to the current one.
    spare: ClusterState,
    /// The proposals applied since `spare` was published.
    lag: Vec<Proposal>,
    /// When the spare was last made a clone of the published version.
    parted_at: Instant,
    /// [`REJOIN_AFTER`], unless set otherwise ([`StateMachine::join_after`]).
    rejoin_after: Duration,
    /// Replaced versions a reader still held, kept until it lets go so that the nodes only they
    /// hold are freed here, off the reader's thread (at most [`RETIRED`]).
    retired: Vec<Arc<ClusterState>>,
    last_applied: Option<LogId<NodeId>>,
    last_membership: Membership,
    current: Option<(Meta, Vec<u8>)>,
    built: u64,
}

/// The state machine. Cheap to clone: clones (the snapshot builder among them) share state.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<Inner>>,
    dir: PathBuf,
    published: watch::Sender<Arc<ClusterState>>,
    spares: Arc<SpareCounts>,
    /// Held while a snapshot is written to disk and made current: a snapshot built from this
    /// node's state and one installed from the leader can be on their way at once (the builder
    /// runs as a task of its own), and they write the same files.
    writing: Arc<tokio::sync::Mutex<()>>,
}

/// What became of the version each apply replaced (see the module's doc), counted since the
/// state machine opened.
#[derive(Debug, Default)]
pub struct SpareCounts {
    /// Taken back as the spare: the next apply changes it in place.
    pub reused: AtomicU64,
    /// Still held by a reader: the spare is a clone of the published version instead.
    pub held: AtomicU64,
    /// Dropped because the copies joined (on the clock or after a bulk write).
    pub joined: AtomicU64,
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn snap_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    io_error(ErrorSubject::Snapshot(None), verb, e)
}

impl StateMachine {
    /// Opens the state machine in `dir`, restoring the last persisted snapshot if there is one.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let mut inner = Inner {
            spare: ClusterState::default(),
            lag: Vec::new(),
            parted_at: Instant::now(),
            rejoin_after: REJOIN_AFTER,
            retired: Vec::new(),
            last_applied: None,
            last_membership: Membership::default(),
            current: None,
            built: 0,
        };
        if let Some((meta, data)) = read_file(dir).map_err(|e| snap_err(ErrorVerb::Read, e))? {
            let body = decode_body(&data).map_err(|e| snap_err(ErrorVerb::Read, e))?;
            inner.spare = body.state;
            inner.last_applied = body.last_applied;
            inner.last_membership = body.last_membership;
            inner.current = Some((meta, data));
        }
        let published = watch::Sender::new(Arc::new(inner.spare.clone()));
        Ok(Self {
            inner: Arc::new(Mutex::new(inner)),
            dir: dir.to_path_buf(),
            published,
            spares: Arc::default(),
            writing: Arc::default(),
        })
    }

    /// The applied state, as of every apply from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.published.subscribe()
    }

    /// A short lock: never held across an await.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets how long the two copies go on apart before they join ([`REJOIN_AFTER`] unless set;
    /// for tests and benches).
    pub fn join_after(&self, period: Duration) {
        self.lock().rejoin_after = period;
    }

    /// What became of the versions applies replaced.
    pub fn spares(&self) -> Arc<SpareCounts> {
        Arc::clone(&self.spares)
    }

    /// The state as last applied (under the lock, it goes with `last_applied`).
    fn current(&self) -> Arc<ClusterState> {
        self.published.borrow().clone()
    }

    /// Publishes `state` (the spare, brought up to date and applied to) and keeps the version
    /// it replaces as the next spare, or a clone of `state` if that version is still held.
    ///
    /// Every [`REJOIN_AFTER`], and after a bulk write ([`BULK`]), the copies join again: the
    /// spare becomes a clone of `state` too, and the nodes only the replaced version held are
    /// freed off the apply path.
    fn publish(&self, g: &mut Inner, state: ClusterState) {
        let replaced = self.published.send_replace(Arc::new(state));
        let commands: usize = g.lag.iter().map(|p| p.command.commands()).sum();
        let rejoin = g.parted_at.elapsed() >= g.rejoin_after || commands >= BULK;
        let kept = match Arc::try_unwrap(replaced) {
            Ok(replaced) if !rejoin => Some(replaced),
            Ok(replaced) => {
                self.spares.joined.fetch_add(1, Ordering::Relaxed);
                free(replaced);
                None
            }
            Err(held) => {
                self.spares.held.fetch_add(1, Ordering::Relaxed);
                if g.retired.len() == RETIRED {
                    free(g.retired.remove(0));
                }
                g.retired.push(held);
                None
            }
        };
        match kept {
            Some(replaced) => {
                self.spares.reused.fetch_add(1, Ordering::Relaxed);
                g.spare = replaced;
            }
            None => {
                g.lag.clear();
                g.spare = ClusterState::clone(&self.current());
                g.parted_at = Instant::now();
            }
        }
        // Retired versions no reader holds any more.
        let unheld: Vec<_> = (g.retired)
            .extract_if(.., |r| Arc::strong_count(r) == 1)
            .collect();
        if !unheld.is_empty() {
            free(unheld);
        }
    }

    /// Makes a snapshot built from this node's state current (written to disk first), unless
    /// a newer one is current already (installed from the leader while this one was being
    /// built): then that one stays, and is what is returned.
    async fn keep_built(&self, meta: Meta, data: Vec<u8>) -> Result<(Meta, Vec<u8>), StorageError> {
        let _writing = self.writing.lock().await;
        let newer = (self.lock().current.as_ref())
            .filter(|(current, _)| current.last_log_id > meta.last_log_id)
            .cloned();
        if let Some(current) = newer {
            return Ok(current);
        }
        self.persist(meta.clone(), data.clone()).await?;
        self.lock().current = Some((meta.clone(), data.clone()));
        Ok((meta, data))
    }

    /// Writes the snapshot file atomically: temp file, fsync, rename, fsync the directory.
    async fn persist(&self, meta: Meta, data: Vec<u8>) -> Result<(), StorageError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let bytes = file_bytes(&meta, &data)?;
            let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
            match std::fs::remove_file(dir.join(OLD_SNAPSHOT_FILE)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
            std::fs::File::open(&dir)?.sync_all()?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))?
        .map_err(|e| snap_err(ErrorVerb::Write, e))
    }
}

/// Drops `what` (a version of the state, or several) on the blocking pool: the nodes only it
/// holds can take milliseconds to free, which is no work for the apply or a runtime thread.
fn free<T: Send + 'static>(what: T) {
    match Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(what))),
        Err(_) => drop(what),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Under the lock only the O(1) copy of the state (its tables are shared, not copied);
        // encoding runs off the lock and off the async runtime.
        let (meta, body, compress) = {
            let mut g = self.lock();
            g.built += 1;
            // Compressed only if every member reads that (see `SNAPSHOT_FORMAT`).
            let state = ClusterState::clone(&self.current());
            let compress = (g.last_membership.membership().nodes())
                .all(|(id, _)| (state.members.get(id)).is_some_and(|m| m.snapshot_format >= 1));
            let body = SnapshotBody {
                last_applied: g.last_applied,
                last_membership: g.last_membership.clone(),
                state,
            };
            let meta = Meta {
                last_log_id: g.last_applied,
                last_membership: g.last_membership.clone(),
                snapshot_id: format!("{}-{}", g.last_applied.map_or(0, |l| l.index), g.built),
            };
            (meta, body, compress)
        };
        let data = tokio::task::spawn_blocking(move || encode_body(&body, compress))
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let (meta, data) = self.keep_built(meta, data).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError> {
        let g = self.lock();
        Ok((g.last_applied, g.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut g = self.lock();
        let g = &mut *g;
        for p in g.lag.drain(..) {
            g.spare.apply(&p);
        }
        let mut out = Vec::new();
        for entry in entries {
            g.last_applied = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Blank => Applied::Unchanged,
                EntryPayload::Normal(p) => {
                    let applied = g.spare.apply(&p);
                    g.lag.push(p);
                    applied
                }
                EntryPayload::Membership(m) => {
                    g.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Applied::Changed
                }
            });
        }
        let state = std::mem::take(&mut g.spare);
        self.publish(g, state);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        // Decompressed and decoded off the async runtime, as a snapshot is built.
        let (body, data) = tokio::task::spawn_blocking(move || (decode_body(&data), data))
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let body = body.map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let _writing = self.writing.lock().await;
        self.persist(meta.clone(), data.clone()).await?;
        let mut g = self.lock();
        let g = &mut *g;
        g.last_applied = meta.last_log_id;
        g.last_membership = meta.last_membership.clone();
        g.current = Some((meta.clone(), data));
        // The spare starts again from the snapshot: what it lagged by came before it. The
        // copies replaced share nothing with it: freed off this thread.
        g.lag.clear();
        let spare = std::mem::replace(&mut g.spare, body.state.clone());
        let published = self.published.send_replace(Arc::new(body.state));
        free((spare, published));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let g = self.lock();
        Ok(g.current.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(data.clone())),
        }))
    }
}

#[cfg(test)]
mod tests;
