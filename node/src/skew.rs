//! A test's hold on this node's wall clock. With `MERIDIAN_TEST_CLOCK_SKEW_FILE` set, the node
//! runs ahead of the system's clock by the number of milliseconds that file holds, read at
//! start and every 5 ms after (see `meridian_policy::clock`). Tests with real processes use it
//! to take a cluster to a window's end instead of waiting up to a minute for it. Only builds
//! with the `test-clock` feature follow it: those that include `meridian-tests`, which asks for
//! it (the test suite's, the bench's, a bare `cargo build` at the workspace root). A build of
//! the node alone (`cargo build --release -p meridian-node`, as the Dockerfile and the README's
//! install do) refuses to start when the variable is set, so a deployment's clock is the
//! system's whatever its environment holds.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The variable naming the file.
pub const ENV: &str = "MERIDIAN_TEST_CLOCK_SKEW_FILE";

/// How often the file is read again.
const EVERY: Duration = Duration::from_millis(5);

/// Follows the file `ENV` names, if it is set: its first reading is in place when this
/// returns, later ones follow on a thread of their own.
pub fn follow_from_env() -> Result<(), String> {
    follow(
        std::env::var_os(ENV).map(PathBuf::from),
        cfg!(feature = "test-clock"),
    )
}

/// Follows `path` when a test named one; a build without the hook (`hook_built` false, as in
/// deployment builds) refuses to start rather than run on a clock a file can move.
fn follow(path: Option<PathBuf>, hook_built: bool) -> Result<(), String> {
    let Some(path) = path else {
        return Ok(());
    };
    if !hook_built {
        return Err(format!(
            "{ENV} is a test hook, and this build has none: tests need a node built with the `test-clock` feature (`cargo build -p meridian-node --features test-clock`, or the workspace's test command)"
        ));
    }
    let first = read(&path).map_err(|e| format!("{ENV}={}: {e}", path.display()))?;
    meridian_policy::clock::set_skew_ms(first);
    tracing::warn!(
        file = %path.display(),
        skew_ms = first,
        "this node's clock follows a test's skew file ({ENV})"
    );
    std::thread::Builder::new()
        .name("test-clock".into())
        .spawn(move || {
            let (mut last, mut said_back, mut said_failed) = (first, false, false);
            loop {
                std::thread::sleep(EVERY);
                // The test replaces the file whole (a rename), so a reading is either the old
                // number or the new one. A failed reading, or a skew smaller than the last
                // (time going back, which windows and sequence numbers do not allow), keeps
                // the last; each is said once.
                match read(&path) {
                    Ok(ms) if ms >= last => {
                        last = ms;
                        meridian_policy::clock::set_skew_ms(ms);
                    }
                    Ok(ms) if !said_back => {
                        said_back = true;
                        tracing::warn!(
                            skew_ms = ms,
                            kept_ms = last,
                            "{ENV}: a skew smaller than the last is ignored"
                        );
                    }
                    Err(e) if !said_failed => {
                        said_failed = true;
                        tracing::warn!(file = %path.display(), "{ENV}: {e}; the last skew is kept");
                    }
                    _ => {}
                }
            }
        })
        .map_err(|e| format!("cannot start the thread following {ENV}: {e}"))?;
    Ok(())
}

fn read(path: &Path) -> Result<i64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    text.trim().parse().map_err(|e| {
        format!(
            "{:?} is not a whole number of milliseconds: {e}",
            text.trim()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_skew_file_holds_whole_milliseconds_and_anything_else_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("skew");
        std::fs::write(&file, "61500\n").unwrap();
        assert_eq!(read(&file), Ok(61_500));
        std::fs::write(&file, "1.5s").unwrap();
        let e = read(&file).unwrap_err();
        assert!(
            e.contains("\"1.5s\" is not a whole number of milliseconds"),
            "{e}"
        );
        assert!(read(&dir.path().join("none")).is_err());
    }

    /// A deployment build (no `test-clock` feature) refuses to start with a skew file named,
    /// even one that reads well; without one named, either build starts.
    #[test]
    fn a_build_without_the_hook_refuses_a_skew_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("skew");
        std::fs::write(&file, "0\n").unwrap();
        let e = follow(Some(file), false).unwrap_err();
        assert!(e.contains("is a test hook, and this build has none"), "{e}");
        assert_eq!(follow(None, false), Ok(()));
        assert_eq!(follow(None, true), Ok(()));
    }
}
