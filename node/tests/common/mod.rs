//! Helpers shared by the tests that run the `meridian` binary as a process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_meridian");

/// A running node and the addresses from its readiness line
/// (`meridian ready http=… grpc=… admin=…`).
pub struct Started {
    pub child: Child,
    pub ready: String,
    /// What the node printed before its readiness line (first-start secrets).
    pub preamble: Vec<String>,
}

impl Started {
    /// The development API key printed on first start.
    /// The development key the first start made: printed (a terminal), or written to the file
    /// the preamble names (standard output piped, as here).
    pub fn dev_key(&self) -> Option<String> {
        self.preamble.iter().find_map(|l| {
            let rest = l.strip_prefix("development API key")?;
            match rest.split_once(" written to ") {
                Some((_, path)) => {
                    let path = path.split(" (").next()?;
                    std::fs::read_to_string(path)
                        .ok()
                        .map(|k| k.trim().to_owned())
                }
                None => rest
                    .split_whitespace()
                    .find(|w| w.starts_with("mk_"))
                    .map(str::to_owned),
            }
        })
    }

    /// The address after `key=` in the readiness line, e.g. `addr("http")`.
    pub fn addr(&self, key: &str) -> String {
        let prefix = format!("{key}=");
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {key} address in {:?}", self.ready))
            .to_owned()
    }
}

/// Starts `cmd` (a `meridian serve …`) and waits for its readiness line. Its later output is
/// drained on a thread so the child never blocks on a full pipe.
pub fn start(cmd: &mut Command) -> Started {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn meridian: {e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut lines = BufReader::new(stdout).lines();
    let mut preamble = Vec::new();
    let ready = loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("meridian ready") => break l,
            Some(Ok(l)) => preamble.push(l),
            _ => panic!("meridian exited before its readiness line: {preamble:?}"),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Started {
        child,
        ready,
        preamble,
    }
}
