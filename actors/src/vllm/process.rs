//! A replica's OS process: launched in its own process group with its output captured, and
//! stopped as a group (vLLM starts engine and worker processes; none may outlive a stop).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// What to run: program, arguments, extra environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl std::fmt::Display for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (k, v) in &self.env {
            write!(f, "{k}={v} ")?;
        }
        write!(f, "{}", self.program)?;
        for a in &self.args {
            write!(f, " {a}")?;
        }
        Ok(())
    }
}

/// The last lines a replica printed (stdout and stderr), bounded.
#[derive(Debug)]
pub struct LogRing {
    lines: Mutex<VecDeque<String>>,
    capacity: usize,
}

impl LogRing {
    pub fn new(capacity: usize) -> Self {
        Self {
            lines: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity,
        }
    }

    pub fn push(&self, line: String) {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines
            .iter()
            .skip(lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }
}

/// The shell that leads each replica's process group, with the server as its child: signals to
/// the group (the node's SIGTERM, then SIGKILL) reach every process in it as before, and the
/// shell ends with the server's own status (or its signal). If the node dies first — even by
/// SIGKILL, when it can clean nothing up — the kernel sends the shell SIGUSR1 (its parent-death
/// signal), and it kills the whole group: the server and every process it started that stayed
/// in the group (vLLM's engine and workers, the mock's children). A process that leaves the
/// group (its own `setsid`) is beyond it: a cgroup (systemd's unit, a container) covers that.
///
/// `trap ':' TERM INT` (a handler, not an ignore, so the server's own signals stay at their
/// defaults) keeps the shell alive until the server has gone; a trapped signal interrupts
/// `wait`, hence the loop.
const GUARD: &str = r#"trap 'kill -s KILL 0' USR1
trap ':' TERM INT
"$@" &
server=$!
while :; do
  wait "$server"
  status=$?
  kill -0 "$server" 2>/dev/null || break
done
if [ "$status" -gt 128 ]; then
  trap - TERM INT
  kill -s "$(kill -l "$status")" $$
fi
exit "$status""#;

/// Starts `launch` under [`GUARD`], the leader of a new process group, its output going to
/// `logs` and to tracing (tagged with `replica`); a crashed or killed node leaves no process of
/// the group holding its GPUs.
pub fn spawn(launch: &Launch, replica: &str, logs: &Arc<LogRing>) -> std::io::Result<Child> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(GUARD)
        .arg("meridian-replica-guard")
        .arg(&launch.program)
        .args(&launch.args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    set_parent_death_signal(&mut cmd);
    let mut child = cmd.spawn()?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(capture(out, replica.to_owned(), Arc::clone(logs)));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(capture(err, replica.to_owned(), Arc::clone(logs)));
    }
    Ok(child)
}

#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command) {
    let node = nix::unistd::getpid();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: prctl(2), getppid(2) and, if the node died before
    // the signal was set (it would never come), exit(2) — system calls through nix, with no
    // allocation and no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGUSR1).map_err(std::io::Error::from)?;
            if nix::unistd::getppid() != node {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
}

async fn capture(stream: impl AsyncRead + Unpin, replica: String, logs: Arc<LogRing>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "meridian::vllm::log", replica = %replica, "{line}");
        logs.push(line);
    }
}

/// Sends `signal` to every process in the group led by `leader`; false if none is left.
pub fn signal_group(leader: u32, signal: Signal) -> bool {
    let Ok(pid) = i32::try_from(leader) else {
        return false;
    };
    killpg(Pid::from_raw(pid), signal).is_ok()
}

/// The live (not zombie) processes of the process group `group`, from `/proc`.
pub fn group_members(group: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                return false;
            };
            let mut fields = after.split_whitespace();
            let state = fields.next();
            let pgrp = fields.nth(1).and_then(|p| p.parse::<u32>().ok());
            pgrp == Some(group) && !matches!(state, Some("Z" | "X"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_group_is_stopped_whole_and_its_output_kept() {
        let logs = Arc::new(LogRing::new(3));
        let launch = Launch {
            program: "sh".into(),
            args: vec![
                "-c".into(),
                "for i in 1 2 3 4; do echo line $i; done; sleep 30 & sleep 30 & wait".into(),
            ],
            env: vec![],
        };
        let mut child = spawn(&launch, "test-0", &logs).unwrap();
        let leader = child.id().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while group_members(leader).len() < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "children never started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while logs.tail(1) != ["line 4"] {
            assert!(
                tokio::time::Instant::now() < deadline,
                "output never captured"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(logs.tail(10), ["line 2", "line 3", "line 4"]);
        assert!(signal_group(leader, Signal::SIGKILL));
        child.wait().await.unwrap();
        while !group_members(leader).is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "orphans: {:?}",
                group_members(leader)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
