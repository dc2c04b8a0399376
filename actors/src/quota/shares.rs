//! A node's share counts across its restarts, in its data directory.
//!
//! While the node runs, `quota.running` exists; a clean stop writes `quota-shares.json` and
//! then removes the marker. A start that finds the marker knows the node stopped without saving
//! (a crash): it cannot know what it admitted from its shares, so it counts the shares of
//! windows begun before this start as spent (released at once, as fully used). A start that
//! finds the saved counts takes them up and goes on from them.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::LimitKind;

const MARKER: &str = "quota.running";
const SAVED: &str = "quota-shares.json";

/// One budget's share, as kept over a restart.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Kept {
    pub scope: String,
    #[serde(with = "kind_code")]
    pub kind: LimitKind,
    pub limit: u64,
    pub window_start: u64,
    pub charged: i64,
    pub share: u64,
    pub share_nodes: u64,
    /// Being released, having admitted this much.
    pub released: Option<u64>,
}

mod kind_code {
    use super::LimitKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &LimitKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(k.code())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<LimitKind, D::Error> {
        let code = String::deserialize(d)?;
        LimitKind::ALL
            .into_iter()
            .find(|k| k.code() == code)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown limit {code:?}")))
    }
}

/// From when this start can vouch for its shares (0: always), and the counts kept by a
/// clean stop. Marks the node running.
pub(super) fn restore(dir: &Path, now_ms: u64) -> (u64, Vec<Kept>) {
    let marker = dir.join(MARKER);
    let saved = dir.join(SAVED);
    let crashed = marker.exists();
    let (kept, unreadable) = match std::fs::read(&saved) {
        _ if crashed => (Vec::new(), false),
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(kept) => (kept, false),
            Err(e) => {
                tracing::warn!(error = %e, "quota: saved share counts unreadable");
                (Vec::new(), true)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), false),
        Err(e) => {
            tracing::warn!(error = %e, "quota: saved share counts unreadable");
            (Vec::new(), true)
        }
    };
    let _ = std::fs::remove_file(&saved);
    let from = if crashed || unreadable {
        tracing::warn!(
            "quota: this node's share counts from before this start are lost (no clean stop); the shares of windows begun before now count as spent"
        );
        now_ms
    } else {
        0
    };
    if let Err(e) = std::fs::create_dir_all(dir).and_then(|()| durable_write(dir, MARKER, b"")) {
        tracing::warn!(error = %e, "quota: cannot mark the node running; shares are not kept over a restart");
        return (now_ms, Vec::new());
    }
    (from, kept)
}

pub(super) fn save(dir: &Path, kept: &[Kept]) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(kept)?;
    durable_write(dir, SAVED, &bytes)?;
    std::fs::remove_file(dir.join(MARKER))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `name` in `dir` atomically and durably: temp file, fsync, rename, fsync the dir.
fn durable_write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}
