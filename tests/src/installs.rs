//! What tests install on first use under the workspace's `target/`: a Python virtualenv with
//! the packages a test drives, or anything another installer puts there.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

/// Runs `command` to its end; an error, naming it `what` and carrying its exit status and what
/// it wrote, when it cannot start or fails.
pub fn run_installer(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = command
        .output()
        .with_context(|| format!("{what} does not run"))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

/// The Python of the virtualenv `target/<name>`, made on first use (once across the test
/// processes) with `packages` installed by pip; it is ready when it imports `modules` (Python's
/// `import` list, e.g. `"openai, anthropic"`).
pub fn python_venv(name: &str, modules: &str, packages: &[&str]) -> anyhow::Result<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(name);
    let python = venv.join("bin/python");
    let imports = |py: &Path| {
        Command::new(py)
            .args(["-c", &format!("import {modules}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    crate::install_once(
        &venv.with_extension("lock"),
        || imports(&python),
        || make_venv(&venv, packages),
    )?;
    Ok(python)
}

/// Makes a virtualenv at `venv` and installs `packages` in it with pip.
pub fn make_venv(venv: &Path, packages: &[&str]) -> anyhow::Result<()> {
    run_installer(
        Command::new("python3").args(["-m", "venv"]).arg(venv),
        "python3 -m venv (install python3-venv)",
    )?;
    run_installer(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(packages),
        &format!("pip install {}", packages.join(" ")),
    )
}
