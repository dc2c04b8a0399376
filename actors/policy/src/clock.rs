//! The wall clock decisions read: the system's, or one a test sets and moves.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds from the system's clock, or from a value its holder sets (a test moves it
/// across a window's end instead of waiting for one).
#[derive(Debug, Clone, Default)]
pub struct WallClock(Option<Arc<AtomicU64>>);

impl WallClock {
    /// The system's clock.
    pub fn system() -> Self {
        WallClock(None)
    }

    /// A clock that reads `unix_ms` (Unix ms), wherever its holder sets it.
    pub fn set_by(unix_ms: Arc<AtomicU64>) -> Self {
        WallClock(Some(unix_ms))
    }

    /// Now, in Unix ms.
    pub fn now_ms(&self) -> u64 {
        match &self.0 {
            Some(set) => set.load(Ordering::Relaxed),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}
