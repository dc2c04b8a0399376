//! A stand-in for `vllm serve`, for supervising tests: it takes vLLM's command line
//! (`mock-vllm serve MODEL --host H --port P [--served-model-name N] [other vLLM flags]`),
//! refuses a flag vLLM does not know as vLLM's argument parser does (exit status 2,
//! `unrecognized arguments`), and behaves like the real server's lifecycle and failure modes:
//!
//! - while "loading" (`MOCK_VLLM_LOADING_MS`) nothing listens: connections are refused, as
//!   they are while vLLM loads weights; then `/health`, `/v1/models`, chat completions
//!   (streaming and not) and `/metrics` with vLLM's metric names are served;
//! - `MOCK_VLLM_CRASH_AFTER_MS`: exits with status 1 that long after start (a crash; with a
//!   short time, restarting it is a crash loop);
//! - `MOCK_VLLM_HANG_AFTER_MS`: from then on chat requests never progress while `/health`
//!   still answers 200;
//! - `MOCK_VLLM_IGNORE_SIGTERM=1`: SIGTERM is ignored (only SIGKILL stops it);
//! - `MOCK_VLLM_CHILDREN=N`: starts N child processes (`sleep`) in its process group, as
//!   vLLM's engine and tensor-parallel workers are;
//! - `MOCK_VLLM_SCRIPT`: the script of requests that bring none (the mock's `x-mock-script`
//!   syntax, e.g. `tokens=20;itl_ms=50`);
//! - `MOCK_VLLM_UNHEALTHY_FILE`: while that file exists, `/health` answers the status written
//!   in it (503, a dead engine, when none);
//! - `--api-key K` (or `VLLM_API_KEY`): Bearer key on `/v1` paths, refused with vLLM's flat
//!   `{"error":"Unauthorized"}`;
//! - the GPUs it was given (`CUDA_VISIBLE_DEVICES`) are in `/mock/stats`
//!   (`cuda_visible_devices`).
//!
//! Like vLLM, it serves only its model (every `--served-model-name`) and its LoRA adapters
//! (`--lora-modules name=path …`, and at run time `/v1/load_lora_adapter` and
//! `/v1/unload_lora_adapter` when `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`); any other model
//! gets 404 `NotFoundError`.
//!
//! Each knob can also be given as a flag (`--mock-loading-ms`, …), which wins over the
//! environment. Prints `mock-vllm ready on HOST:PORT` once it serves.

use std::time::Duration;

use meridian_tests::mock::{Flavor, MockOptions, MockUpstream};

#[derive(Debug, Default)]
struct Args {
    model: String,
    served: Vec<String>,
    lora: Vec<(String, String)>,
    host: String,
    port: u16,
    loading: Duration,
    crash_after: Option<Duration>,
    hang_after: Option<Duration>,
    ignore_sigterm: bool,
    children: u32,
    /// `--api-key` (or `VLLM_API_KEY`): a Bearer key on `/v1` paths.
    api_key: Option<String>,
}

/// vLLM's flags that take no value (a subset of `vllm serve --help`), and the mock's own.
const BOOLEAN_FLAGS: &[&str] = &[
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--enable-chunked-prefill",
    "--no-enable-chunked-prefill",
    "--enable-lora",
    "--disable-log-requests",
    "--disable-log-stats",
    "--enforce-eager",
    "--trust-remote-code",
    "--mock-ignore-sigterm",
];

/// vLLM's flags that take a value (a subset of `vllm serve --help`), and the mock's own.
const VALUE_FLAGS: &[&str] = &[
    "--host",
    "--port",
    "--api-key",
    "--served-model-name",
    "--lora-modules",
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--data-parallel-size",
    "--gpu-memory-utilization",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--max-model-len",
    "--max-loras",
    "--max-lora-rank",
    "--dtype",
    "--kv-cache-dtype",
    "--quantization",
    "--seed",
    "--download-dir",
    "--tokenizer",
    "--revision",
    "--chat-template",
    "--swap-space",
    "--block-size",
    "--load-format",
    "--uvicorn-log-level",
    "--distributed-executor-backend",
    "--generation-config",
    "--device",
    "--mock-loading-ms",
    "--mock-crash-after-ms",
    "--mock-hang-after-ms",
    "--mock-children",
];

fn ms(v: &str, what: &str) -> anyhow::Result<Duration> {
    Ok(Duration::from_millis(v.parse().map_err(|_| {
        anyhow::anyhow!("{what} needs milliseconds, got {v:?}")
    })?))
}

fn parse() -> anyhow::Result<Args> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut a = Args {
        host: "127.0.0.1".into(),
        port: 8000,
        ..Args::default()
    };
    if let Some(v) = env("MOCK_VLLM_LOADING_MS") {
        a.loading = ms(&v, "MOCK_VLLM_LOADING_MS")?;
    }
    if let Some(v) = env("MOCK_VLLM_CRASH_AFTER_MS") {
        a.crash_after = Some(ms(&v, "MOCK_VLLM_CRASH_AFTER_MS")?);
    }
    if let Some(v) = env("MOCK_VLLM_HANG_AFTER_MS") {
        a.hang_after = Some(ms(&v, "MOCK_VLLM_HANG_AFTER_MS")?);
    }
    a.ignore_sigterm = env("MOCK_VLLM_IGNORE_SIGTERM").is_some_and(|v| v == "1");
    a.api_key = env("VLLM_API_KEY");
    if let Some(v) = env("MOCK_VLLM_CHILDREN") {
        a.children = v.parse()?;
    }
    let mut it = std::env::args().skip(1).peekable();
    if it.peek().map(String::as_str) == Some("serve") {
        it.next();
    }
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        if !flag.starts_with("--") {
            a.model = flag;
            continue;
        }
        // vLLM's boolean flags take no value; every other flag takes one.
        let boolean = BOOLEAN_FLAGS.contains(&flag.as_str());
        if !boolean && !VALUE_FLAGS.contains(&flag.as_str()) {
            eprintln!(
                "usage: vllm serve [model_tag] [options]\nvllm serve: error: unrecognized arguments: {flag}"
            );
            std::process::exit(2);
        }
        let mut value = || -> anyhow::Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("{flag} needs a value")),
            }
        };
        // vLLM's list flags take every value up to the next flag.
        if matches!(flag.as_str(), "--served-model-name" | "--lora-modules") {
            let mut values: Vec<String> = inline.clone().into_iter().collect();
            while let Some(v) = it.next_if(|v| !v.starts_with("--")) {
                values.push(v);
            }
            if values.is_empty() {
                anyhow::bail!("{flag} needs at least one value");
            }
            if flag == "--served-model-name" {
                a.served = values;
            } else {
                for m in values {
                    let (name, path) = m.split_once('=').ok_or_else(|| {
                        anyhow::anyhow!("--lora-modules takes name=path, got {m:?}")
                    })?;
                    a.lora.push((name.into(), path.into()));
                }
            }
            continue;
        }
        match flag.as_str() {
            "--host" => a.host = value()?,
            "--port" => a.port = value()?.parse()?,
            "--mock-loading-ms" => a.loading = ms(&value()?, &flag)?,
            "--mock-crash-after-ms" => a.crash_after = Some(ms(&value()?, &flag)?),
            "--mock-hang-after-ms" => a.hang_after = Some(ms(&value()?, &flag)?),
            "--mock-children" => a.children = value()?.parse()?,
            "--mock-ignore-sigterm" => a.ignore_sigterm = true,
            "--api-key" => a.api_key = Some(value()?),
            _ if boolean => {}
            _ => {
                value()?;
            }
        }
    }
    if a.model.is_empty() {
        anyhow::bail!("usage: mock-vllm serve MODEL --host HOST --port PORT [vLLM flags]");
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    if !args.ignore_sigterm {
        tokio::spawn(async move {
            term.recv().await;
            eprintln!("mock-vllm: SIGTERM, shutting down");
            std::process::exit(0);
        });
    } else {
        // Handled and ignored: the process stays up until SIGKILL.
        tokio::spawn(async move {
            while term.recv().await.is_some() {
                eprintln!("mock-vllm: SIGTERM ignored");
            }
        });
    }
    let mut children = Vec::new();
    for _ in 0..args.children {
        children.push(std::process::Command::new("sleep").arg("3600").spawn()?);
    }
    if let Some(after) = args.crash_after {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            eprintln!("mock-vllm: crashing as scripted");
            std::process::exit(1);
        });
    }
    eprintln!("mock-vllm: loading {} for {:?}", args.model, args.loading);
    tokio::time::sleep(args.loading).await;
    let listen = format!("{}:{}", args.host, args.port).parse()?;
    let mock = MockUpstream::start(MockOptions {
        listen,
        flavor: Flavor::Vllm,
        served_model: args.served.first().cloned().unwrap_or(args.model),
        aliases: args.served.iter().skip(1).cloned().collect(),
        lora: args.lora,
        lora_runtime: std::env::var("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
            .is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1"),
        strict_models: true,
        default_script: std::env::var("MOCK_VLLM_SCRIPT").unwrap_or_default(),
        // Counted from when it serves.
        hang_after: args.hang_after,
        api_key: args.api_key,
        unhealthy_when: std::env::var_os("MOCK_VLLM_UNHEALTHY_FILE").map(Into::into),
        visible_gpus: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
    })
    .await?;
    println!("mock-vllm ready on {}", mock.addr);
    mock.wait().await;
    Ok(())
}
