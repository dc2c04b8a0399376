//! What the replica actors publish and the supervisor, the admin API and metrics read: each
//! replica's status, and the supervisor's counters.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use super::ReplicaStatus;

/// What every replica looks like now, as its actor last published it (with when it entered its
/// state and when it last became ready). Read by the admin API and metrics without a mailbox.
#[derive(Clone, Default)]
pub struct Board {
    inner: Arc<Mutex<BoardMap>>,
}

type BoardMap = BTreeMap<String, (ReplicaStatus, Instant, Option<Instant>)>;

impl Board {
    pub(crate) fn lock(&self) -> MutexGuard<'_, BoardMap> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct VllmStats {
    pub crashes: AtomicU64,
    pub scale_ups: AtomicU64,
    pub scale_downs: AtomicU64,
    /// Scale-ups wanted but not done: no free GPU or port.
    pub scale_blocked: AtomicU64,
}
