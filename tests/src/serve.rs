//! `meridian serve` as a process of its own, on a configuration file, the way a service manager
//! starts it.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::procs::meridian_bin;

/// Starts `meridian serve --config CONFIG`: what it prints goes to `stdout`; its standard error
/// (its logs, and why it would not start) is the test's, shown when the test fails.
pub fn serve(config: &Path, stdout: Stdio) -> std::io::Result<Child> {
    Command::new(meridian_bin())
        .args(["serve", "--config"])
        .arg(config)
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .spawn()
}
