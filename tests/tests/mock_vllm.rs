//! The mock vLLM process behaves like `vllm serve` where a supervisor can tell: refused
//! connections while loading, then the real endpoints; scripted crashes, hangs, an ignored
//! SIGTERM, and child processes in its process group.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meridian_tests::ReservedPort;

fn spawn(port: u16, extra: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mock-vllm"));
    cmd.args([
        "serve",
        "meta-llama/Llama-3.1-8B-Instruct",
        "--host",
        "127.0.0.1",
    ])
    .args(["--port", &port.to_string()])
    .args([
        "--served-model-name",
        "llama-8b",
        "--tensor-parallel-size",
        "1",
    ])
    .args(["--enable-prefix-caching", "--gpu-memory-utilization", "0.9"])
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

async fn health(port: u16) -> Option<u16> {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/health"))
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

async fn until_healthy(port: u16) -> Duration {
    let started = Instant::now();
    while health(port).await != Some(200) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Process ids whose parent is `pid`, and their state letter (`Z`: a zombie).
fn children_of(pid: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …: comm may hold spaces, so split after the last ')'.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap().chars().next().unwrap();
        let ppid: u32 = fields.next().unwrap().parse().unwrap();
        if ppid == pid {
            out.push((child, state));
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
}

#[tokio::test]
async fn it_refuses_connections_while_loading_then_serves_like_vllm() {
    let held = ReservedPort::new().unwrap();
    let port = held.port();
    let mut child = spawn(port, &["--mock-loading-ms", "500"], &[]);
    assert_eq!(health(port).await, None, "refused while loading");
    let took = until_healthy(port).await;
    println!("mock vLLM ready after {took:?} (loading 500 ms)");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    let base = format!("http://127.0.0.1:{port}");
    let models: serde_json::Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "llama-8b");
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_hits_total",
    ] {
        assert!(metrics.contains(name), "{name} in /metrics");
    }
    // SIGTERM stops it.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn it_crashes_when_told() {
    let held = ReservedPort::new().unwrap();
    let port = held.port();
    let mut child = spawn(port, &[], &[("MOCK_VLLM_CRASH_AFTER_MS", "300")]);
    until_healthy(port).await;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "still running 3 × its 300 ms after it was healthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(1));
    assert_eq!(health(port).await, None, "the port is dead");
}

#[tokio::test]
async fn a_hung_server_stays_healthy_but_makes_no_progress() {
    let held = ReservedPort::new().unwrap();
    let port = held.port();
    let mut child = spawn(port, &["--mock-hang-after-ms", "0"], &[]);
    until_healthy(port).await;
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .timeout(Duration::from_millis(500))
        .json(&serde_json::json!({"model": "llama-8b", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await;
    assert!(resp.is_err_and(|e| e.is_timeout()), "no progress");
    assert_eq!(health(port).await, Some(200), "still healthy");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn only_sigkill_to_its_group_stops_one_that_ignores_sigterm_and_its_children() {
    let held = ReservedPort::new().unwrap();
    let port = held.port();
    let mut child = spawn(
        port,
        &["--mock-ignore-sigterm"],
        &[("MOCK_VLLM_CHILDREN", "2")],
    );
    until_healthy(port).await;
    let pid = child.id();
    let kids = children_of(pid);
    assert_eq!(kids.len(), 2, "{kids:?}");
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(child.try_wait().unwrap().is_none(), "SIGTERM is ignored");
    assert_eq!(health(port).await, Some(200));
    // The whole process group.
    let killed = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pid}")])
        .status()
        .unwrap();
    assert!(killed.success(), "kill the process group");
    child.wait().unwrap();
    let started = Instant::now();
    while kids.iter().any(|(k, _)| alive(*k)) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "children outlived the group kill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn an_unknown_flag_is_refused_as_vllms_argument_parser_refuses_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_mock-vllm"))
        .args(["serve", "m", "--port", "1", "--no-such-flag", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: unrecognized arguments: --no-such-flag"),
        "{err}"
    );
}

#[tokio::test]
async fn health_fails_on_demand_with_the_status_asked() {
    let held = ReservedPort::new().unwrap();
    let port = held.port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unhealthy");
    let file_env = file.display().to_string();
    let mut child = spawn(port, &[], &[("MOCK_VLLM_UNHEALTHY_FILE", &file_env)]);
    until_healthy(port).await;
    std::fs::write(&file, "").unwrap();
    assert_eq!(health(port).await, Some(503), "a dead engine by default");
    std::fs::write(&file, "500").unwrap();
    assert_eq!(health(port).await, Some(500));
    std::fs::remove_file(&file).unwrap();
    assert_eq!(health(port).await, Some(200));
    let _ = child.kill();
    let _ = child.wait();
}
