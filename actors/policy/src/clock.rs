//! The wall clock decisions read: the system's, or one a test sets and moves.
//!
//! A test moves it in one of two ways:
//! - in one process, with a clock that reads a value the test sets ([`WallClock::set_by`]);
//! - across real processes, with a skew added to the system's clock in each of them
//!   ([`set_skew_ms`]; a node run with `MERIDIAN_TEST_CLOCK_SKEW_FILE` follows the file), so that
//!   a test takes a whole cluster to a window's end instead of waiting for it. The test process
//!   itself reads the same skew through [`WallClock::ahead_by`].
//!
//! A skew only ever grows: windows, grant expiries and flush sequence numbers assume that time
//! does not go back.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds this process's clock runs ahead of the system's (zero but under a test).
static SKEW_MS: AtomicI64 = AtomicI64::new(0);

/// Now, in Unix ms: the system's clock plus this process's skew. The node's own clock
/// (`WallClock::system()`) reads it, and so does what reads no configured clock (call-log
/// retention, flush sequence numbers). JWT expiry is checked by its library against the
/// system's clock.
pub fn unix_ms() -> u64 {
    let system = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    system.saturating_add_signed(SKEW_MS.load(Ordering::Relaxed))
}

/// Sets this process's skew (see the module docs).
pub fn set_skew_ms(ms: i64) {
    SKEW_MS.store(ms, Ordering::Relaxed);
}

/// Unix milliseconds from [`unix_ms`], from a value its holder sets (a test moves it across a
/// window's end instead of waiting for one), or from [`unix_ms`] plus a skew its holder moves.
#[derive(Debug, Clone, Default)]
pub struct WallClock(Source);

#[derive(Debug, Clone, Default)]
enum Source {
    #[default]
    System,
    Set(Arc<AtomicU64>),
    Ahead(Arc<AtomicI64>),
}

impl WallClock {
    /// The system's clock (with this process's skew).
    pub fn system() -> Self {
        WallClock(Source::System)
    }

    /// A clock that reads `unix_ms` (Unix ms), wherever its holder sets it.
    pub fn set_by(unix_ms: Arc<AtomicU64>) -> Self {
        WallClock(Source::Set(unix_ms))
    }

    /// The system's clock ahead by `skew_ms`, wherever its holder moves it (a test that skews
    /// the nodes it runs reads their time through this).
    pub fn ahead_by(skew_ms: Arc<AtomicI64>) -> Self {
        WallClock(Source::Ahead(skew_ms))
    }

    /// Now, in Unix ms.
    pub fn now_ms(&self) -> u64 {
        match &self.0 {
            Source::System => unix_ms(),
            Source::Set(set) => set.load(Ordering::Relaxed),
            Source::Ahead(skew) => unix_ms().saturating_add_signed(skew.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_ahead_moves_with_its_skew_and_a_set_clock_reads_its_value() {
        let skew = Arc::new(AtomicI64::new(0));
        let ahead = WallClock::ahead_by(Arc::clone(&skew));
        let before = WallClock::system().now_ms();
        skew.store(3_600_000, Ordering::Relaxed);
        let moved = ahead.now_ms();
        assert!(
            (before + 3_600_000..before + 3_660_000).contains(&moved),
            "{moved} is not an hour after {before}"
        );
        let set = WallClock::set_by(Arc::new(AtomicU64::new(42)));
        assert_eq!(set.now_ms(), 42);
    }
}
