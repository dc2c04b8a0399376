//! GPU discovery with `nvidia-smi`: how many GPUs, their memory, and which are free.
//! A machine without it (or without GPUs) is not an error: replicas then run on the GPUs
//! the configuration names, unchecked (or on none: a CPU build, or a test's mock).

use std::time::Duration;

/// One GPU as `nvidia-smi` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub memory_total_mib: u64,
    pub memory_used_mib: u64,
}

impl Gpu {
    /// Nobody's weights are on it: under 5 % of its memory (and at most 1 GiB) in use.
    pub fn is_free(&self) -> bool {
        self.memory_used_mib <= (self.memory_total_mib / 20).min(1024)
    }
}

/// What discovery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    Found(Vec<Gpu>),
    /// No `nvidia-smi`, or it failed: why, in words an operator can act on.
    Unavailable(String),
}

impl Discovery {
    /// The GPU of this index, when discovery found GPUs.
    pub fn gpu(&self, index: u32) -> Option<&Gpu> {
        match self {
            Self::Found(gpus) => gpus.iter().find(|g| g.index == index),
            Self::Unavailable(_) => None,
        }
    }
}

/// Runs `command` (normally `nvidia-smi`) and reads its GPU list.
pub async fn discover(command: &str) -> Discovery {
    let run = tokio::process::Command::new(command)
        .args([
            "--query-gpu=index,name,memory.total,memory.used",
            "--format=csv,noheader,nounits",
        ])
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Err(_) => Discovery::Unavailable(format!("{command} did not answer within 10 s")),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Discovery::Unavailable(format!(
            "{command} is not installed (no NVIDIA driver on this machine): GPU discovery is off, \
             and [[vllm]] replicas get the GPUs their configuration names, unchecked"
        )),
        Ok(Err(e)) => Discovery::Unavailable(format!("cannot run {command}: {e}")),
        Ok(Ok(out)) if !out.status.success() => Discovery::Unavailable(format!(
            "{command} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Ok(out)) => match parse(&String::from_utf8_lossy(&out.stdout)) {
            Ok(gpus) => Discovery::Found(gpus),
            Err(e) => Discovery::Unavailable(format!("cannot read {command}'s output: {e}")),
        },
    }
}

/// A line of nvidia-smi's output that is not what was asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuListError {
    #[error("expected 4 fields, got {line:?}")]
    Fields { line: String },
    #[error("{field} is not a number in {line:?}")]
    NotANumber { field: &'static str, line: String },
    #[error("index out of range in {line:?}")]
    IndexRange { line: String },
}

/// `index, name, memory.total, memory.used` per line (CSV, no header, no units).
pub fn parse(text: &str) -> Result<Vec<Gpu>, GpuListError> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, name, total, used] = fields[..] else {
                return Err(GpuListError::Fields { line: line.into() });
            };
            let number = |v: &str, field: &'static str| {
                v.parse::<u64>().map_err(|_| GpuListError::NotANumber {
                    field,
                    line: line.into(),
                })
            };
            Ok(Gpu {
                index: u32::try_from(number(index, "index")?)
                    .map_err(|_| GpuListError::IndexRange { line: line.into() })?,
                name: name.to_owned(),
                memory_total_mib: number(total, "memory.total")?,
                memory_used_mib: number(used, "memory.used")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nvidia_smi_csv_and_tells_free_from_busy() {
        let gpus =
            parse("0, NVIDIA H100 80GB HBM3, 81559, 1\n1, NVIDIA H100 80GB HBM3, 81559, 73210\n\n")
                .unwrap();
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].index, 0);
        assert_eq!(gpus[0].name, "NVIDIA H100 80GB HBM3");
        assert!(gpus[0].is_free());
        assert!(!gpus[1].is_free());
        assert!(
            parse("0, H100, lots, 1")
                .unwrap_err()
                .to_string()
                .contains("memory.total")
        );
        assert!(
            parse("0, H100")
                .unwrap_err()
                .to_string()
                .contains("4 fields")
        );
    }

    #[tokio::test]
    async fn a_missing_nvidia_smi_is_a_message_not_a_crash() {
        let d = discover("/nonexistent/nvidia-smi").await;
        let Discovery::Unavailable(why) = d else {
            panic!("found GPUs with no nvidia-smi: {d:?}");
        };
        assert!(why.contains("not installed"), "{why}");
    }
}
