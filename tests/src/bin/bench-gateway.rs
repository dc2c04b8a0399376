//! The gateway benchmark: how much a Meridian node costs over calling the upstream directly.
//!
//! Starts the mock upstream and a node as separate processes (use release builds:
//! `cargo build --release -p meridian-node -p meridian-tests --bins`), then drives both with
//! `wrk` (installed with apt-get if missing): p50/p99 latency at concurrency 1, and throughput
//! plus p99 at concurrency 64, for non-streaming and streaming (16 content chunks) requests.
//! Prints a table with the through/direct ratios and writes it to `target/bench-gateway.md`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Rounds of (direct, through) measurements; figures are medians over rounds, and each
    /// ratio is taken within a round, so drift in the machine's speed cancels out.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Only the auth + quota on/off comparison (skips direct versus through).
    #[arg(long)]
    auth_only: bool,
    /// Instead of timing, count the instructions the node executes per request with auth +
    /// quotas off and on (each node runs under valgrind's callgrind and serves `--requests`
    /// requests, 64 at a time). Repeatable to a fraction of a percent, unlike CPU time on a
    /// shared machine.
    #[arg(long)]
    instructions: bool,
    /// With `--instructions`: requests per node, sent 64 at a time (a multiple of 64).
    #[arg(long, default_value_t = 2048)]
    requests: usize,
    /// With `--instructions`: keep each node's callgrind profile in this folder
    /// (`callgrind.off.1`, `callgrind.on.1`; read them with `callgrind_annotate`).
    #[arg(long)]
    keep_profiles: Option<PathBuf>,
    /// With `--instructions`: both nodes trace, sampling this fraction of requests (`--traces`
    /// alone: every request), and export over OTLP/gRPC to a collector in this process that
    /// takes the spans, as a collector in production would; the spans each node sent are
    /// counted and printed.
    #[arg(long, num_args = 0..=1, default_missing_value = "1", value_name = "RATIO")]
    traces: Option<f64>,
    /// Instead: end users under a per-user tokens/day limit. Times a known user's request and
    /// a new user's first request (c=1, in turns), after 1,000 users and again after this many
    /// more new users (sent 32 at a time); and the node's c=64 throughput and resident memory
    /// before and after those users.
    #[arg(long)]
    users: Option<u64>,
    /// Instead: a node started on a replicated state at production scale (10,000 tenants,
    /// 100,000 API keys, 10,000 hot users' ledger entries, 90 days of roll-ups, written into
    /// its data directory before it starts) against one started on an empty state: the time
    /// each takes to be ready, then in alternating rounds each one's c=64 throughput, CPU per
    /// request and resident memory.
    #[arg(long)]
    large_state: bool,
    /// Where `meridian` and `mock-upstream` live (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// Kills the child when dropped, so no process outlives the benchmark.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd`, waits for a stdout line containing `marker`, returns the process and the line.
fn spawn_ready(cmd: &mut Command, marker: &str) -> anyhow::Result<(Proc, String)> {
    spawn_ready_with(cmd, marker).map(|(p, l, _)| (p, l))
}

/// As [`spawn_ready`], also returning the lines printed before the marker.
fn spawn_ready_with(
    cmd: &mut Command,
    marker: &str,
) -> anyhow::Result<(Proc, String, Vec<String>)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let proc = Proc(child);
    let mut lines = BufReader::new(stdout).lines();
    let mut before = Vec::new();
    for line in lines.by_ref() {
        let line = line?;
        if line.contains(marker) {
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return Ok((proc, line, before));
        }
        before.push(line);
    }
    bail!("{cmd:?} exited before printing {marker:?}")
}

fn field<'a>(line: &'a str, key: &str) -> anyhow::Result<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .with_context(|| format!("no {key} in {line:?}"))
}

fn ensure_wrk() -> anyhow::Result<()> {
    if Command::new("wrk").arg("--version").output().is_ok() {
        return Ok(());
    }
    eprintln!("wrk not found; installing it with apt-get");
    let ok = Command::new("sh")
        .args(["-c", "apt-get update -qq && apt-get install -y -qq wrk"])
        .status()?
        .success();
    if !ok {
        bail!("could not install wrk (apt-get install wrk)");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Requests completed in the run.
    requests: f64,
}

/// CPU time (user + system) the process `pid` has used so far, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // `pid (comm) state …`: utime and stime are the 12th and 13th fields after `)`.
    let after = &stat[stat.rfind(')').context("bad /proc stat")? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // The kernel's USER_HZ is 100 on Linux.
    Ok(ticks as f64 / 100.0)
}

/// `wrk` against `url` while measuring how much CPU the node `pid` spends per request (µs).
/// The machine's CPU ticks stolen by the hypervisor and its ticks in all, from `/proc/stat`.
fn steal_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    Some((*ticks.get(7)?, ticks.iter().take(8).sum()))
}

fn wrk_cpu(
    url: &str,
    script: &Path,
    conns: u32,
    secs: u64,
    pid: u32,
) -> anyhow::Result<(Run, f64)> {
    let before = cpu_seconds(pid)?;
    let run = wrk(url, script, conns, secs)?;
    let used = cpu_seconds(pid)? - before;
    let per_request_us = used * 1e6 / run.requests.max(1.0);
    Ok((run, per_request_us))
}

fn parse_ms(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

fn wrk(url: &str, script: &Path, conns: u32, secs: u64) -> anyhow::Result<Run> {
    let threads = conns.min(2);
    let out = Command::new("wrk")
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &conns.to_string(),
            "-d",
            &format!("{secs}s"),
            "--latency",
            // Generous: under callgrind (`--instructions`) the node is ~50 times slower.
            "--timeout",
            "30s",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        bail!("wrk saw errors against {url}: {line}\n{text}");
    }
    let pick = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
            .with_context(|| format!("no {prefix:?} in wrk output:\n{text}"))
    };
    let requests = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|(n, _)| n.trim().to_owned())
        })
        .with_context(|| format!("no request count in wrk output:\n{text}"))?
        .parse()?;
    Ok(Run {
        requests,
        rps: pick("Requests/sec:")?.parse()?,
        p50_ms: parse_ms(pick("50%")?).context("p50")?,
        p99_ms: parse_ms(pick("99%")?).context("p99")?,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The first and third quartiles (nearest rank).
fn quartiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 4], v[(v.len() * 3) / 4])
}

fn lua(dir: &Path, name: &str, body: &str) -> anyhow::Result<PathBuf> {
    lua_with(dir, name, body, None)
}

/// A wrk script that POSTs `body`, with `Authorization: Bearer KEY` when a key is given.
fn lua_with(dir: &Path, name: &str, body: &str, key: Option<&str>) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    let escaped = body.replace('\\', "\\\\").replace('\'', "\\'");
    let auth = key.map_or(String::new(), |k| {
        format!("wrk.headers['Authorization'] = 'Bearer {k}'\n")
    });
    std::fs::write(
        &path,
        format!(
            "wrk.method = 'POST'\nwrk.body = '{escaped}'\nwrk.headers['Content-Type'] = 'application/json'\n{auth}"
        ),
    )?;
    Ok(path)
}

/// The non-streaming request every unary run sends.
const UNARY_BODY: &str =
    r#"{"model":"mock","max_tokens":16,"messages":[{"role":"user","content":"benchmark"}]}"#;

/// Writes a node config to `path`: ephemeral listeners, data in `data`, the `extra` sections,
/// and the mock upstream at `mock_addr` as provider `mock` serving `models` (a TOML list).
fn write_node_config(
    path: &Path,
    data: &Path,
    extra: &str,
    mock_addr: &str,
    models: &str,
) -> anyhow::Result<()> {
    std::fs::write(
        path,
        format!(
            "[node]\ndata_dir = {data:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[grpc]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{extra}\n\
             [[providers]]\nid = \"mock\"\nkind = \"openai\"\nbase_url = \"http://{mock_addr}/v1\"\n\
             models = {models}\nmax_concurrency = 4096\nqueue_capacity = 4096\n"
        ),
    )?;
    Ok(())
}

/// `cmd` (the node binary itself, or a wrapper such as valgrind that runs it) with the
/// arguments that serve `config`.
fn serve(mut cmd: Command, meridian: &Path, config: &Path) -> Command {
    if cmd.get_program() != meridian.as_os_str() {
        cmd.arg(meridian);
    }
    cmd.args(["serve", "--config"])
        .arg(config)
        .env("MERIDIAN_LOG", "warn");
    cmd
}

/// The development API key a node makes on its first start: printed to a terminal, else
/// written to the file its line names (as here: standard output is a pipe).
fn dev_key(lines: &[String]) -> anyhow::Result<String> {
    lines
        .iter()
        .find_map(|l| {
            let rest = l.strip_prefix("development API key")?;
            match rest.split_once(" written to ") {
                Some((_, path)) => std::fs::read_to_string(path.split(" (").next()?)
                    .ok()
                    .map(|k| k.trim().to_owned()),
                None => rest
                    .split_whitespace()
                    .find(|w| w.starts_with("mk_"))
                    .map(str::to_owned),
            }
        })
        .context("the node made no development key (or its file could not be read)")
}

/// Gives the development tier (unreachable) tokens/min and requests/min limits, so that every
/// request is estimated, admitted and settled.
fn limit_dev_tier(bin_dir: &Path, admin_addr: &str, data: &Path) -> anyhow::Result<()> {
    let limited = Command::new(bin_dir.join("meridian"))
        .args([
            "admin",
            "--addr",
            &format!("http://{admin_addr}"),
            "--token-file",
        ])
        .arg(data.join("admin.token"))
        .args([
            "tier",
            "put",
            "dev",
            "--tokens-per-minute",
            "1000000000000",
            "--requests-per-minute",
            "1000000000000",
        ])
        .output()?;
    if !limited.status.success() {
        bail!(
            "could not set the dev tier's limits: {}",
            String::from_utf8_lossy(&limited.stderr)
        );
    }
    Ok(())
}

/// How many of its own proposals node `addr` has had applied (`meridian_cluster_commit`'s
/// count in its `/metrics`): the grants, renewals and usage flushes its quotas made.
fn proposals(addr: &str) -> anyhow::Result<u64> {
    let text = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            reqwest::get(format!("http://{addr}/metrics"))
                .await?
                .text()
                .await
        })?;
    text.lines()
        .find_map(|l| l.strip_prefix("meridian_cluster_commit_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .context("no meridian_cluster_commit_seconds_count in /metrics")
}

/// A request of end user `user`.
fn user_body(user: &str) -> String {
    format!(
        r#"{{"model":"mock","max_tokens":16,"user":"{user}","messages":[{{"role":"user","content":"benchmark"}}]}}"#
    )
}

/// A known user's request against a new user's first, whole requests through a node with auth
/// and a per-user limit on (c=1, in turns, 2,000 of each), after 1,000 users and after `more`.
fn new_and_known_users(
    bin_dir: &Path,
    dir: &Path,
    mock_addr: &str,
    more: u64,
) -> anyhow::Result<String> {
    let meridian = bin_dir.join("meridian");
    let config = dir.join("node-users.toml");
    let data = dir.join("data-users");
    write_node_config(&config, &data, "", mock_addr, r#"["mock"]"#)?;
    let (node, line, before) = spawn_ready_with(
        &mut serve(Command::new(&meridian), &meridian, &config),
        "meridian ready",
    )?;
    let url = format!("http://{}/v1/chat/completions", field(&line, "http=")?);
    let key = dev_key(&before)?;
    // c=64, each request from one of the first 1,000 users (budgets already made).
    let spread = dir.join("users-c64.lua");
    std::fs::write(
        &spread,
        format!(
            "wrk.method = 'POST'\nwrk.headers['Content-Type'] = 'application/json'\nwrk.headers['Authorization'] = 'Bearer {key}'\nlocal n = 0\nrequest = function()\n  n = n + 1\n  return wrk.format(nil, nil, nil, '{{\"model\":\"mock\",\"max_tokens\":16,\"user\":\"seen-' .. (n % 1000) .. '\",\"messages\":[{{\"role\":\"user\",\"content\":\"benchmark\"}}]}}')\nend\n"
        ),
    )?;
    let pid = node.0.id();
    let load = |label: &str| -> anyhow::Result<String> {
        wrk(&url, &spread, 8, 1)?;
        // The median of three 5 s runs by throughput: one run on a shared 2-core machine
        // varies by more than the difference looked for.
        // The node's CPU time per request is steadier than throughput on a shared machine.
        let mut runs = (0..3)
            .map(|_| wrk_cpu(&url, &spread, 64, 5, pid))
            .collect::<anyhow::Result<Vec<(Run, f64)>>>()?;
        runs.sort_by(|a, b| a.0.rps.total_cmp(&b.0.rps));
        let (run, _) = runs[1];
        let mut cpu: Vec<f64> = runs.iter().map(|r| r.1).collect();
        cpu.sort_by(f64::total_cmp);
        Ok(format!(
            "| {label} | {:.0} | {:.2} ms | {:.2} ms | {:.1} µs | {} MiB |\n",
            run.rps,
            run.p50_ms,
            run.p99_ms,
            cpu[1],
            rss_mib(pid)?
        ))
    };
    let admin = field(&line, "admin=")?.to_owned();
    let tier = Command::new(&meridian)
        .args([
            "admin",
            "--addr",
            &format!("http://{admin}"),
            "--token-file",
        ])
        .arg(data.join("admin.token"))
        .args(["tier", "put", "dev", "--per-user", "tokens_per_day=1000000"])
        .output()?;
    if !tier.status.success() {
        bail!("tier put: {}", String::from_utf8_lossy(&tier.stderr));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let send = |user: String| {
        let request = client
            .post(&url)
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(user_body(&user));
        async move {
            let started = std::time::Instant::now();
            let answer = request.send().await?;
            let status = answer.status();
            answer.bytes().await?;
            if !status.is_success() {
                bail!("the node answered {status} for {user}");
            }
            anyhow::Ok(started.elapsed().as_secs_f64() * 1_000.0)
        }
    };
    let mut next = 0u64;
    let mut add_users = |count: u64| -> anyhow::Result<()> {
        let from = next;
        next += count;
        runtime.block_on(async {
            let lanes = (0..32).map(|lane| {
                let send = &send;
                async move {
                    let mut u = from + lane;
                    while u < from + count {
                        send(format!("seen-{u}")).await?;
                        u += 32;
                    }
                    anyhow::Ok(())
                }
            });
            for done in futures::future::join_all(lanes).await {
                done?;
            }
            anyhow::Ok(())
        })
    };
    let mut fresh = 0u64;
    let mut turns = |label: &str| -> anyhow::Result<String> {
        let (mut known, mut new) = (Vec::new(), Vec::new());
        runtime.block_on(async {
            for _ in 0..2_000 {
                known.push(send("known".into()).await?);
                fresh += 1;
                new.push(send(format!("new-{fresh}")).await?);
            }
            anyhow::Ok(())
        })?;
        let (known_p50, new_p50) = (median(known.clone()), median(new.clone()));
        let p99 = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() * 99 / 100]
        };
        Ok(format!(
            "| {label} | {known_p50:.3} ms | {:.3} ms | {new_p50:.3} ms | {:.3} ms | {:.2} |\n",
            p99(known),
            p99(new),
            new_p50 / known_p50
        ))
    };
    add_users(1_000)?;
    let mut report = String::from(
        "| users seen | known user p50 | p99 | new user's first request p50 | p99 | new ÷ known (p50) |\n|---|---|---|---|---|---|\n",
    );
    report.push_str(&turns("1,000")?);
    let mut throughput = String::from(
        "\n| users seen | c=64 requests/s | p50 | p99 | node CPU per request | node RSS |\n|---|---|---|---|---|---|\n",
    );
    throughput.push_str(&load("3,000")?);
    let started = std::time::Instant::now();
    add_users(more)?;
    eprintln!(
        "{more} more users in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    report.push_str(&turns(&grouped(1_000 + more + 2_000))?);
    throughput.push_str(&load(&grouped(1_000 + more + 4_000))?);
    report.push_str(&throughput);
    Ok(report)
}

/// See `Args::large_state`. Both nodes run with auth on and the product's defaults; their
/// one client tenant has tokens/min and requests/min limits of 10^12.
fn large_state(
    bin_dir: &Path,
    tmp: &Path,
    mock_addr: &str,
    secs: u64,
    rounds: usize,
) -> anyhow::Result<String> {
    use meridian_tests::big_state::{self, Scale};
    let meridian = bin_dir.join("meridian");
    let key = meridian_actors::auth::generate_key()?;
    let limits = meridian_proto::cluster::Limits {
        tokens_per_minute: Some(1_000_000_000_000),
        requests_per_minute: Some(1_000_000_000_000),
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let mut nodes = Vec::new();
    for (name, scale) in [("empty", Scale::EMPTY), ("large", Scale::PRODUCTION)] {
        let data = tmp.join(format!("data-{name}"));
        let written = Instant::now();
        runtime.block_on(big_state::write(&data, scale, limits, &key))?;
        let written = written.elapsed();
        let config = tmp.join(format!("node-{name}.toml"));
        write_node_config(&config, &data, "", mock_addr, r#"["mock"]"#)?;
        let started = Instant::now();
        let (node, line) = spawn_ready(
            &mut serve(Command::new(&meridian), &meridian, &config),
            "meridian ready",
        )?;
        let ready = started.elapsed();
        let url = format!("http://{}/v1/chat/completions", field(&line, "http=")?);
        eprintln!("{name} state written in {written:?}; node ready {ready:?} after it started");
        nodes.push((name, node, url, ready));
    }
    let script = lua_with(tmp, "unary-bench.lua", UNARY_BODY, Some(&key.secret))?;
    for (_, _, url, _) in &nodes {
        wrk(url, &script, 8, 1)?;
    }
    // (req/s, CPU µs per request) of each node, per round; which goes first alternates.
    let mut runs: Vec<[(f64, f64); 2]> = Vec::new();
    for round in 0..rounds.max(1) {
        let mut pair = [(0.0, 0.0); 2];
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (_, node, url, _) = &nodes[i];
            let (run, cpu) = wrk_cpu(url, &script, 64, secs, node.0.id())?;
            pair[i] = (run.rps, cpu);
        }
        eprintln!(
            "large state ÷ empty: throughput {:.3}, CPU per request {:.3}",
            pair[1].0 / pair[0].0,
            pair[1].1 / pair[0].1
        );
        runs.push(pair);
    }
    let mut report = String::from(
        "| state | node ready after start | c=64 req/s | node CPU per request | node RSS |
|---|---|---|---|---|
",
    );
    for (i, (name, node, _, ready)) in nodes.iter().enumerate() {
        report.push_str(&format!(
            "| {name} | {:.2} s | {:.0} | {:.1} µs | {} MiB |
",
            ready.as_secs_f64(),
            median(runs.iter().map(|r| r[i].0).collect()),
            median(runs.iter().map(|r| r[i].1).collect()),
            rss_mib(node.0.id())?
        ));
    }
    let ratios: Vec<f64> = runs.iter().map(|r| r[1].0 / r[0].0).collect();
    let (q1, q3) = quartiles(ratios.clone());
    report.push_str(&format!(
        "
c=64 throughput, large ÷ empty: {:.3} (median of {} rounds; quartiles {q1:.3}–{q3:.3}); node CPU per request, large ÷ empty: {:.3}.
",
        median(ratios),
        runs.len(),
        median(runs.iter().map(|r| r[1].1 / r[0].1).collect()),
    ));
    Ok(report)
}

/// The resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<u64> {
    let status = procfs::process::Process::new(i32::try_from(pid)?)?.status()?;
    Ok(status.vmrss.context("no VmRSS in /proc status")? / 1024)
}

/// `n` with its thousands grouped by commas (1,003,000).
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ensure_valgrind() -> anyhow::Result<()> {
    if Command::new("valgrind").arg("--version").output().is_ok() {
        return Ok(());
    }
    eprintln!("valgrind not found; installing it with apt-get");
    let ok = Command::new("sh")
        .args([
            "-c",
            "apt-get update -qq && apt-get install -y -qq valgrind",
        ])
        .status()?
        .success();
    if !ok {
        bail!("could not install valgrind (apt-get install valgrind)");
    }
    Ok(())
}

/// Sends `per_connection` requests (the unary body, with `key` if given) on each of 64
/// keep-alive connections, one after another on each, and waits for every answer; returns how
/// many were sent. The connections are opened and used once before `start` runs, so what is
/// counted after it is whole requests only: no connection setup, and none cut off at the end.
fn exact_load(
    url: &str,
    key: Option<&str>,
    per_connection: usize,
    start: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    const CONNECTIONS: usize = 64;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONNECTIONS)
        .timeout(std::time::Duration::from_secs(120))
        .build()?;
    let send = |client: reqwest::Client, count: usize| {
        let mut request = client
            .post(url)
            .header("content-type", "application/json")
            .body(UNARY_BODY);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move {
            for _ in 0..count {
                let answer = request.try_clone().context("request body")?.send().await?;
                let status = answer.status();
                answer.bytes().await?;
                if !status.is_success() {
                    bail!("the node answered {status}");
                }
            }
            anyhow::Ok(())
        }
    };
    let all = |count: usize| {
        let tasks: Vec<_> = (0..CONNECTIONS)
            .map(|_| runtime.spawn(send(client.clone(), count)))
            .collect();
        runtime.block_on(async {
            for task in tasks {
                task.await??;
            }
            anyhow::Ok(())
        })
    };
    // 64 at once: each opens its own connection, and all stay in the pool.
    all(1)?;
    start()?;
    all(per_connection)?;
    Ok(CONNECTIONS * per_connection)
}

/// The portable SHA-256 block function, which the node runs only where the CPU lacks SHA
/// extensions (as valgrind's does).
const SOFT_SHA256: &str = "sha2::sha256::soft::*compress";

/// Instructions the node executes per request at c=64 with auth + quotas off and on, each node
/// under callgrind with instrumentation switched on only for the measured load.
fn instruction_counts(
    bin_dir: &Path,
    tmp: &Path,
    profiles: &Path,
    mock_addr: &str,
    per_connection: usize,
    traces: Option<f64>,
) -> anyhow::Result<String> {
    ensure_valgrind()?;
    // The collector runs on a runtime of its own for as long as the nodes do.
    let collector_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let collector = match traces {
        Some(_) => Some(collector_runtime.block_on(meridian_tests::otlp::Collector::start())?),
        None => None,
    };
    let mut per_request = Vec::new();
    let mut spans_seen = 0;
    for on in [false, true] {
        let name = if on { "on" } else { "off" };
        let data = tmp.join(format!("data-cg-{name}"));
        let config = tmp.join(format!("node-cg-{name}.toml"));
        // The usage flush and the slices' renewals run on timers (the flush 20 times a second,
        // a renewal about every 1.5 s per limit by default), not per request: at callgrind's
        // pace each would be shared by ~50 times fewer requests than at full speed, so both are
        // put off here and this counts the per-request path alone.
        let auth = if on {
            "[quota]\nflush_every = \"1h\"\ngrant_ttl = \"1h\"\n"
        } else {
            "[auth]\nenabled = false\n"
        };
        write_node_config(&config, &data, auth, mock_addr, r#"["mock"]"#)?;
        let out = profiles.join(format!("callgrind.{name}"));
        let mut callgrind = Command::new("valgrind");
        callgrind
            .args(["--tool=callgrind", "--instr-atstart=no"])
            // Valgrind's CPU has no SHA extensions, so the key's SHA-256 would run in software
            // (about 10,000 instructions per request, against a few hundred with the SHA
            // instructions the node uses on real CPUs): its block function is not counted.
            // (Naming a function to toggle would otherwise start with collection off.)
            .arg(format!("--toggle-collect={SOFT_SHA256}"))
            .arg("--collect-atstart=yes")
            .arg(format!("--callgrind-out-file={}", out.display()));
        if let Some((_, addr)) = &collector {
            callgrind
                .env(
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    format!("http://{addr}"),
                )
                .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
                .env("OTEL_TRACES_SAMPLER_ARG", traces.unwrap_or(1.0).to_string());
        }
        let (node, line, before) = spawn_ready_with(
            &mut serve(callgrind, &bin_dir.join("meridian"), &config),
            "meridian ready",
        )?;
        let http = field(&line, "http=")?.to_owned();
        let key = if on {
            limit_dev_tier(bin_dir, field(&line, "admin=")?, &data)?;
            Some(dev_key(&before)?)
        } else {
            None
        };
        let url = format!("http://{http}/v1/chat/completions");
        let control = |arg: &str| -> anyhow::Result<()> {
            let ok = Command::new("callgrind_control")
                .args([arg, &node.0.id().to_string()])
                .output()?
                .status
                .success();
            if !ok {
                bail!("callgrind_control {arg} failed");
            }
            Ok(())
        };
        let requests = exact_load(&url, key.as_deref(), per_connection, || {
            control("--instr=on")
        })?;
        control("--instr=off")?;
        control("--dump")?;
        // The dump is the first numbered file; its `totals:` line counts every instruction.
        let dump = out.with_extension(format!("{name}.1"));
        let mut totals = None;
        for _ in 0..100 {
            totals = std::fs::read_to_string(&dump).ok().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("totals:"))
                    .and_then(|n| n.trim().parse::<f64>().ok())
            });
            if totals.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let totals = totals.with_context(|| format!("no totals in {}", dump.display()))?;
        eprintln!(
            "auth+quota {name}: {} requests, {:.0} instructions each",
            requests,
            totals / requests as f64
        );
        per_request.push(totals / requests as f64);
        if let Some((collector, _)) = &collector {
            // Until the node's batches stop coming (it sends a partial batch every 5 s).
            let mut last = (collector.spans().len(), Instant::now());
            while last.1.elapsed() < std::time::Duration::from_secs(7) {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let now = collector.spans().len();
                if now != last.0 {
                    last = (now, Instant::now());
                }
            }
        }
        drop(node);
        if let Some((collector, _)) = &collector {
            // Every span of the measured requests and of the 64 that opened the connections.
            let spans = collector.spans().len();
            eprintln!(
                "auth+quota {name}: the collector took {} spans",
                spans - spans_seen
            );
            spans_seen = spans;
        }
    }
    Ok(format!(
        "\n| node instructions per request, c=64, under callgrind | auth+quota off | on | on ÷ off |\n|---|---|---|---|\n| | {:.0} | {:.0} | {:.3} |\n\n\
         Per-request path only: the on node's usage flush and slice renewals (timers, not per \
         request) are put off. Valgrind's CPU has no SHA extensions, so the key's SHA-256 would \
         run in software there; its block function (`{SOFT_SHA256}`) is not counted. On a CPU \
         with the extensions it costs a few hundred instructions per request, which this \
         leaves out.\n",
        per_request[0],
        per_request[1],
        per_request[1] / per_request[0]
    ))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("binary has no directory")?
            .to_path_buf(),
    };
    ensure_wrk()?;
    let tmp = tempfile::tempdir()?;

    let (_mock, line) = spawn_ready(
        Command::new(bin_dir.join("mock-upstream")).args(["--flavor", "openai"]),
        "listening on",
    )?;
    let mock_addr = line.rsplit(' ').next().context("mock address")?.to_owned();
    let secs = args.duration;
    if args.instructions {
        let profiles = args
            .keep_profiles
            .clone()
            .unwrap_or_else(|| tmp.path().to_owned());
        std::fs::create_dir_all(&profiles)?;
        let report = instruction_counts(
            &bin_dir,
            tmp.path(),
            &profiles,
            &mock_addr,
            args.requests / 64,
            args.traces,
        )?;
        println!("{report}");
        return Ok(());
    }
    if args.large_state {
        let report = large_state(&bin_dir, tmp.path(), &mock_addr, secs, args.rounds)?;
        println!("{report}");
        return Ok(());
    }
    if let Some(more) = args.users {
        let report = new_and_known_users(&bin_dir, tmp.path(), &mock_addr, more)?;
        println!("{report}");
        return Ok(());
    }
    let meridian = bin_dir.join("meridian");
    let config = tmp.path().join("node.toml");
    write_node_config(
        &config,
        &tmp.path().join("data"),
        "[auth]\nenabled = false\n",
        &mock_addr,
        r#"["mock", "mock@tokens:16"]"#,
    )?;
    let (node, line) = spawn_ready(
        &mut serve(Command::new(&meridian), &meridian, &config),
        "meridian ready",
    )?;
    let node_addr = field(&line, "http=")?.to_owned();

    let unary = lua(tmp.path(), "unary.lua", UNARY_BODY)?;
    // The same gateway as a user runs it, authentication and cluster-wide quotas on: a second
    // node whose development tenant gets (unreachable) tokens/min and requests/min limits, so
    // every request is authenticated, estimated with the tokenizer, admitted and settled. With
    // no static share, every admission draws on slices granted through Raft, renewed as their
    // grants run out and at each new minute (with the default share of half the limit, limits
    // this large would never be spent past it, and no grant would be asked for). The gateway table below goes through this one;
    // the auth + quota rounds compare it with the first.
    let on_config = tmp.path().join("node-on.toml");
    let on_data = tmp.path().join("data-on");
    write_node_config(
        &on_config,
        &on_data,
        "[quota]\nstatic_share = 0.0\n",
        &mock_addr,
        r#"["mock", "mock@tokens:16"]"#,
    )?;
    let (node_on, line, before) = spawn_ready_with(
        &mut serve(Command::new(&meridian), &meridian, &on_config),
        "meridian ready",
    )?;
    let on_addr = field(&line, "http=")?.to_owned();
    let admin_addr = field(&line, "admin=")?.to_owned();
    let key = dev_key(&before)?;
    limit_dev_tier(&bin_dir, &admin_addr, &on_data)?;
    let with_key = lua_with(tmp.path(), "unary-key.lua", UNARY_BODY, Some(&key))?;
    let stream_key = lua_with(
        tmp.path(),
        "stream-key.lua",
        r#"{"model":"mock@tokens:16","stream":true,"messages":[{"role":"user","content":"benchmark"}]}"#,
        Some(&key),
    )?;
    let mut report = String::new();
    let modes = if args.auth_only {
        Vec::new()
    } else {
        report.push_str(
            "Through Meridian with auth on (an API key) and the tenant limited (tokens/min and requests/min of 10^12, no static share: every request admitted from slices granted through Raft, renewed as their grants run out and at each new minute, and settled).\n\n",
        );
        report.push_str(
            "| mode | c=1 p50 direct | c=1 p50 through | added p50 | c=1 p99 direct | c=1 p99 through | c=64 req/s direct | c=64 req/s through | ratio | c=64 p99 direct | c=64 p99 through |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        vec![
            ("non-streaming", &with_key),
            ("streaming, 16 chunks", &stream_key),
        ]
    };
    for (mode, script) in modes {
        let direct_url = format!("http://{mock_addr}/v1/chat/completions");
        let node_url = format!("http://{on_addr}/v1/chat/completions");
        // Warm up connections and caches on both paths.
        wrk(&direct_url, script, 8, 1)?;
        wrk(&node_url, script, 8, 1)?;
        let mut rounds = Vec::new();
        for _ in 0..args.rounds.max(1) {
            let d1 = wrk(&direct_url, script, 1, secs)?;
            let n1 = wrk(&node_url, script, 1, secs)?;
            let d64 = wrk(&direct_url, script, 64, secs)?;
            let n64 = wrk(&node_url, script, 64, secs)?;
            eprintln!(
                "{mode}: round ratio {:.2}, added p50 {:+.3} ms",
                n64.rps / d64.rps,
                n1.p50_ms - d1.p50_ms
            );
            rounds.push([d1, n1, d64, n64]);
        }
        let med = |f: &dyn Fn(&[Run; 4]) -> f64| median(rounds.iter().map(f).collect());
        report.push_str(&format!(
            "| {mode} | {:.3} ms | {:.3} ms | {:+.3} ms | {:.3} ms | {:.3} ms | {:.0} | {:.0} | {:.2} | {:.2} ms | {:.2} ms |\n",
            med(&|r| r[0].p50_ms),
            med(&|r| r[1].p50_ms),
            med(&|r| r[1].p50_ms - r[0].p50_ms),
            med(&|r| r[0].p99_ms),
            med(&|r| r[1].p99_ms),
            med(&|r| r[2].rps),
            med(&|r| r[3].rps),
            med(&|r| r[3].rps / r[2].rps),
            med(&|r| r[2].p99_ms),
            med(&|r| r[3].p99_ms),
        ));
    }
    let off_url = format!("http://{node_addr}/v1/chat/completions");
    let on_url = format!("http://{on_addr}/v1/chat/completions");
    wrk(&on_url, &with_key, 8, 1)?;
    let (off_pid, on_pid) = (node.0.id(), node_on.0.id());
    let mut rounds = Vec::new();
    let steal_before = steal_ticks();
    // The node's CPU time per request at c=64, off and on: the cost that caps throughput when
    // the node is the bottleneck, and far less noisy than req/s on a shared 2-core machine.
    let mut cpu = Vec::new();
    let proposals_before = proposals(&on_addr)?;
    for round in 0..args.rounds.max(1) {
        // Alternate which node goes first, so drift in the machine's speed cancels out.
        let (off1, on1, (off64, off_cpu), (on64, on_cpu)) = if round % 2 == 0 {
            let off1 = wrk(&off_url, &unary, 1, secs)?;
            let on1 = wrk(&on_url, &with_key, 1, secs)?;
            let off64 = wrk_cpu(&off_url, &unary, 64, secs, off_pid)?;
            let on64 = wrk_cpu(&on_url, &with_key, 64, secs, on_pid)?;
            (off1, on1, off64, on64)
        } else {
            let on1 = wrk(&on_url, &with_key, 1, secs)?;
            let off1 = wrk(&off_url, &unary, 1, secs)?;
            let on64 = wrk_cpu(&on_url, &with_key, 64, secs, on_pid)?;
            let off64 = wrk_cpu(&off_url, &unary, 64, secs, off_pid)?;
            (off1, on1, off64, on64)
        };
        eprintln!(
            "auth+quota: round throughput on/off {:.3}, node CPU per request off {off_cpu:.1} µs, on {on_cpu:.1} µs ({:+.1} %), added p50 {:+.3} ms",
            on64.rps / off64.rps,
            (on_cpu / off_cpu - 1.0) * 100.0,
            on1.p50_ms - off1.p50_ms
        );
        cpu.push((off_cpu, on_cpu));
        rounds.push([off1, on1, off64, on64]);
    }
    let proposed = proposals(&on_addr)? - proposals_before;
    let steal = steal_before.zip(steal_ticks()).map(|((s0, t0), (s1, t1))| {
        100.0 * (s1.saturating_sub(s0)) as f64 / (t1.saturating_sub(t0)).max(1) as f64
    });
    let cpu_off = median(cpu.iter().map(|c| c.0).collect());
    let cpu_on = median(cpu.iter().map(|c| c.1).collect());
    let ratios: Vec<f64> = cpu.iter().map(|c| c.1 / c.0).collect();
    let cpu_ratio = median(ratios.clone());
    let (q1, q3) = quartiles(ratios);
    let med = |f: &dyn Fn(&[Run; 4]) -> f64| median(rounds.iter().map(f).collect());
    report.push_str(&format!(
        "\n| non-streaming, c=64 | req/s auth+quota off | req/s on | on ÷ off | c=1 p50 off | c=1 p50 on |\n|---|---|---|---|---|---|\n| | {:.0} | {:.0} | {:.3} | {:.3} ms | {:.3} ms |\n",
        med(&|r| r[2].rps),
        med(&|r| r[3].rps),
        med(&|r| r[3].rps / r[2].rps),
        med(&|r| r[0].p50_ms),
        med(&|r| r[1].p50_ms),
    ));
    report.push_str(&format!(
        "\n| node CPU per request, c=64 | auth+quota off | on | on ÷ off (median of {} rounds) | quartiles | throughput cost when the node is the bottleneck |\n|---|---|---|---|---|---|\n| | {cpu_off:.1} µs | {cpu_on:.1} µs | {cpu_ratio:.3} | {q1:.3}–{q3:.3} | {:.1} % |\n",
        cpu.len(),
        (1.0 - 1.0 / cpu_ratio) * 100.0
    ));
    report.push_str(&format!(
        "\nThe on node's quotas made {proposed} Raft proposals during these rounds (slice grants and renewals, usage flushes).\n"
    ));
    if let Some(steal) = steal {
        // On a shared virtual machine, time taken by other guests makes every figure above
        // noisier; `--instructions` is the measure that does not depend on it.
        report.push_str(&format!(
            "
CPU time stolen by the hypervisor during these rounds: {steal:.1} % of the machine's.\n"
        ));
    }
    println!("{report}");
    let out = bin_dir.join("../bench-gateway.md");
    std::fs::write(&out, &report)?;
    eprintln!("written to {}", out.display());
    Ok(())
}
