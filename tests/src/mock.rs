//! A mock OpenAI-compatible / vLLM upstream that speaks the real wire format byte for byte.
//!
//! Behaviour is scripted per request, by the `x-mock-script` header or by the model name after
//! an `@` (`mock@tokens:3;fail_after:2`), with `key=value` (or `key:value`, which fits in a
//! model name that a router config maps with `=`) pairs separated by `;` or `,`:
//!
//! | key | effect |
//! |---|---|
//! | `tokens=N` | content tokens to generate (default 8) |
//! | `ttft_ms=N` | delay before the first token (and before a non-streamed answer) |
//! | `itl_ms=N` | delay between tokens |
//! | `fail=STATUS` | answer STATUS at once, with this flavour's error body (429/503 carry `retry-after: 1`) |
//! | `fail_after=K` | stream: after K tokens send an in-band error event then `[DONE]` (as vLLM does) |
//! | `close_after=K` | stream: after K tokens cut the connection (no `[DONE]`) |
//! | `stall_after=K` | stream: after K tokens go silent until the client leaves |
//! | `content=cr` / `content=done` | token text holds `\r\n` / a forged `data: [DONE]` event |
//! | `flavor=vllm` / `flavor=openai` | override the server's flavour for this request |
//!
//! Flavours differ as the real servers do: OpenAI puts `"usage":null` on every chunk when usage
//! is requested and uses string error codes; vLLM omits `usage` on intermediate chunks, uses
//! integer error codes and class-style error types.
//!
//! Counters (the ground truth for tests): requests received, streams completed, streams aborted
//! by the client, scripted failures. `GET /mock/stats` returns them as JSON.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use futures::StreamExt;
use meridian_policy::clock::WallClock;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod apis;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    OpenAi,
    Vllm,
    /// Anthropic Messages (`POST /v1/messages`), named stream events, Anthropic error bodies.
    Anthropic,
}

#[derive(Debug, Clone)]
pub struct MockOptions {
    pub listen: SocketAddr,
    pub flavor: Flavor,
    /// The model name `/v1/models` lists and `/metrics` labels.
    pub served_model: String,
    /// From this long after start, chat requests hang (no byte is ever sent) while `/health`
    /// still answers 200: the failure a supervisor must detect by the lack of token progress.
    pub hang_after: Option<Duration>,
    /// Further names of the base model (`--served-model-name a b`).
    pub aliases: Vec<String>,
    /// LoRA adapters loaded at start (`--lora-modules name=path`), as (name, path).
    pub lora: Vec<(String, String)>,
    /// Serves vLLM's runtime LoRA endpoints (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`).
    pub lora_runtime: bool,
    /// Answers 404 `NotFoundError` for a model it does not serve, as vLLM does (off: any
    /// name is accepted, for tests that route several model names to one mock).
    pub strict_models: bool,
    /// The script of requests that bring none (same syntax as `x-mock-script`).
    pub default_script: String,
    /// Requires `Authorization: Bearer <key>` on `/v1` paths (vLLM's `--api-key`, or an OpenAI
    /// key), answered as each server answers a missing or wrong key.
    pub api_key: Option<String>,
    /// While this file exists, `/health` answers the status written in it (503, vLLM's answer
    /// for a dead engine, when it holds none): a health failure on demand.
    pub unhealthy_when: Option<std::path::PathBuf>,
    /// The GPUs it was given (`CUDA_VISIBLE_DEVICES`), reported in `/mock/stats`.
    pub visible_gpus: Option<String>,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            flavor: Flavor::Vllm,
            served_model: "mock".into(),
            hang_after: None,
            aliases: Vec::new(),
            lora: Vec::new(),
            lora_runtime: false,
            strict_models: false,
            default_script: String::new(),
            api_key: None,
            unhealthy_when: None,
            visible_gpus: None,
        }
    }
}

/// What the mock actually did.
#[derive(Debug, Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub completed: AtomicU64,
    pub aborted: AtomicU64,
    /// Content tokens that streams the client went away from had been handed to the wire.
    pub aborted_tokens: AtomicU64,
    pub failed: AtomicU64,
    pub running: AtomicU64,
    /// Streaming requests that asked for the final usage chunk.
    pub usage_requested: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// TCP connections accepted (keep-alive reuse shows as fewer connections than requests).
    pub connections: AtomicU64,
    /// Tokens (prompt + completion) of completed requests by the wall-clock minute
    /// (Unix minutes, on [`MockStats::clock`]) in which each request arrived: what a
    /// per-minute limit must bound, without the skew of reading the counters at a minute
    /// boundary.
    pub tokens_by_minute: std::sync::Mutex<std::collections::BTreeMap<u64, u64>>,
    /// The clock those minutes are read from: the system's, or the one of the nodes it serves
    /// when a test moves theirs ([`MockStats::follow`]).
    clock: std::sync::Mutex<WallClock>,
    /// Tokens (prompt + completion) of completed non-streaming chat requests by their `user`
    /// field: what a per-user limit must bound.
    pub tokens_by_user: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// The W3C `traceparent` of each chat request that carried one, in arrival order.
    pub traceparents: std::sync::Mutex<Vec<String>>,
    /// The output cap each chat request asked for (`max_completion_tokens`, else `max_tokens`).
    pub output_caps: std::sync::Mutex<Vec<Option<u64>>>,
    /// The body of the last text completion, embeddings or Messages request, as received (a
    /// Messages request's `anthropic-beta` header under the key `(anthropic-beta)`).
    pub last_request: std::sync::Mutex<Option<Value>>,
    /// Each answer's wait to its first token, as vLLM's `vllm:time_to_first_token_seconds`
    /// histogram counts it.
    pub ttft: std::sync::Mutex<FirstTokens>,
}

/// vLLM's time-to-first-token buckets (seconds), as its `/metrics` exposes them.
pub const VLLM_TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// Times to first token, counted into [`VLLM_TTFT_BUCKETS`] (and `+Inf`, the last count).
#[derive(Debug, Default)]
pub struct FirstTokens {
    pub counts: [u64; 23],
    pub sum_seconds: f64,
}

impl FirstTokens {
    fn record(&mut self, ttft: Duration) {
        let s = ttft.as_secs_f64();
        let i = VLLM_TTFT_BUCKETS.iter().position(|b| s <= *b).unwrap_or(22);
        self.counts[i] += 1;
        self.sum_seconds += s;
    }

    /// The histogram's lines in vLLM's exposition form, for model `m`.
    fn exposition(&self, m: &str) -> String {
        let mut out = String::from(
            "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.\n\
             # TYPE vllm:time_to_first_token_seconds histogram\n",
        );
        let mut cumulative = 0;
        let bounds = VLLM_TTFT_BUCKETS.iter().map(|b| b.to_string());
        for (i, le) in bounds.chain(["+Inf".to_owned()]).enumerate() {
            cumulative += self.counts[i];
            out += &format!(
                "vllm:time_to_first_token_seconds_bucket{{engine=\"0\",le=\"{le}\",model_name=\"{m}\"}} {cumulative}.0\n"
            );
        }
        out += &format!(
            "vllm:time_to_first_token_seconds_count{{engine=\"0\",model_name=\"{m}\"}} {cumulative}.0\n\
             vllm:time_to_first_token_seconds_sum{{engine=\"0\",model_name=\"{m}\"}} {}\n",
            self.sum_seconds
        );
        out
    }
}

impl MockStats {
    /// Reads minutes from `clock` from now on (the clock of the nodes it serves).
    pub fn follow(&self, clock: WallClock) {
        *self.clock.lock().unwrap_or_else(|e| e.into_inner()) = clock;
    }

    /// The current Unix minute on its clock.
    pub fn minute_now(&self) -> u64 {
        self.clock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .now_ms()
            / 60_000
    }

    /// Tokens of requests that arrived in Unix minute `minute`.
    pub fn tokens_in_minute(&self, minute: u64) -> u64 {
        let by = self
            .tokens_by_minute
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        by.get(&minute).copied().unwrap_or(0)
    }

    fn served(&self, arrived_minute: u64, prompt: u64, completion: u64) {
        self.prompt_tokens.fetch_add(prompt, SeqCst);
        self.completion_tokens.fetch_add(completion, SeqCst);
        let mut by = self
            .tokens_by_minute
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *by.entry(arrived_minute).or_default() += prompt + completion;
    }

    fn served_user(&self, user: Option<&str>, tokens: u64) {
        if let Some(user) = user {
            let mut by = self
                .tokens_by_user
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *by.entry(user.to_owned()).or_default() += tokens;
        }
    }

    pub fn snapshot(&self) -> Value {
        json!({
            "requests": self.requests.load(SeqCst),
            "completed": self.completed.load(SeqCst),
            "aborted": self.aborted.load(SeqCst),
            "failed": self.failed.load(SeqCst),
            "running": self.running.load(SeqCst),
            "usage_requested": self.usage_requested.load(SeqCst),
            "prompt_tokens": self.prompt_tokens.load(SeqCst),
            "completion_tokens": self.completion_tokens.load(SeqCst),
            "connections": self.connections.load(SeqCst),
        })
    }
}

/// A running mock; stops when dropped.
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub stats: Arc<MockStats>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl MockUpstream {
    /// The output caps its chat requests asked for, in arrival order.
    pub fn output_caps(&self) -> Vec<Option<u64>> {
        self.stats
            .output_caps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The `traceparent`s its chat requests carried, in arrival order.
    pub fn traceparents(&self) -> Vec<String> {
        self.stats
            .traceparents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub async fn start(opts: MockOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(opts.listen).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(MockStats::default());
        let app = router(Arc::new(Shared {
            adapters: std::sync::Mutex::new(opts.lora.clone()),
            opts,
            stats: Arc::clone(&stats),
            started: std::time::Instant::now(),
        }));
        let (stop, stopped) = oneshot::channel::<()>();
        // Without TCP_NODELAY, Nagle's algorithm holds back every chunk after the first for
        // the peer's delayed ACK (~40 ms): no real server streams like that.
        let counted = Arc::clone(&stats);
        let listener = listener.tap_io(move |tcp| {
            let _ = tcp.set_nodelay(true);
            counted.connections.fetch_add(1, SeqCst);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            stats,
            stop: Some(stop),
            task,
        })
    }

    /// Starts a mock of `flavor`, every other option at its default.
    pub async fn with_flavor(flavor: Flavor) -> std::io::Result<Self> {
        Self::start(MockOptions {
            flavor,
            ..MockOptions::default()
        })
        .await
    }

    /// Waits until `n` streams in all have been aborted by their client (the caller went away
    /// or the gateway dropped the call).
    pub async fn wait_aborted(&self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        crate::wait_until("the upstream call to be dropped", timeout, || async {
            self.stats.aborted.load(SeqCst) == n
        })
        .await
    }

    /// The API root to configure a provider with.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stops gracefully (idle keep-alive connections are closed) and waits until the listener
    /// is gone, so the address can be bound again.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }

    /// Serves until the process is stopped (the binary's main loop).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

struct Shared {
    opts: MockOptions,
    /// LoRA adapters loaded now, as (name, path).
    adapters: std::sync::Mutex<Vec<(String, String)>>,
    stats: Arc<MockStats>,
    started: std::time::Instant,
}

impl Shared {
    fn adapters(&self) -> std::sync::MutexGuard<'_, Vec<(String, String)>> {
        self.adapters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether it serves `model`: the base model by any of its names, or a loaded adapter.
    fn serves(&self, model: &str) -> bool {
        model == self.opts.served_model
            || self.opts.aliases.iter().any(|a| a == model)
            || self.adapters().iter().any(|(n, _)| n == model)
    }
    /// Hangs for good once the scripted hang has begun (counted as running meanwhile).
    async fn maybe_hang(&self) {
        if self
            .opts
            .hang_after
            .is_some_and(|after| self.started.elapsed() >= after)
        {
            self.stats.running.fetch_add(1, SeqCst);
            std::future::pending::<()>().await;
        }
    }
}

async fn health(State(s): State<Arc<Shared>>) -> StatusCode {
    let Some(file) = &s.opts.unhealthy_when else {
        return StatusCode::OK;
    };
    match std::fs::read_to_string(file) {
        Ok(text) => text
            .trim()
            .parse()
            .ok()
            .and_then(|code| StatusCode::from_u16(code).ok())
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        Err(_) => StatusCode::OK,
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(apis::completions))
        .route("/v1/embeddings", post(apis::embeddings))
        .route("/v1/messages", post(messages))
        .route("/v1/models", get(models))
        .route("/v1/load_lora_adapter", post(load_lora))
        .route("/v1/unload_lora_adapter", post(unload_lora))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route(
            "/mock/stats",
            get(|State(s): State<Arc<Shared>>| async move {
                let mut stats = s.stats.snapshot();
                stats["cuda_visible_devices"] = s.opts.visible_gpus.clone().into();
                axum::Json(stats)
            }),
        )
        .with_state(shared)
}

/// One request's script.
#[derive(Debug, Clone, Default)]
struct Script {
    tokens: usize,
    ttft: Duration,
    itl: Duration,
    fail: Option<u16>,
    fail_after: Option<usize>,
    close_after: Option<usize>,
    stall_after: Option<usize>,
    content: Content,
    flavor: Option<Flavor>,
    /// Anthropic: prompt tokens reported as read from the prompt cache.
    cached: usize,
    /// Answer with a call of this tool: Anthropic, a tool_use block after the text; OpenAI
    /// flavours, `tool_calls` instead of content, until the conversation holds `rounds` tool
    /// results (then a text answer, as a model that got what it needed).
    tool: Option<String>,
    /// How many tool results a conversation needs before the model answers in text (OpenAI
    /// flavours; default 1).
    rounds: usize,
    /// The request's output cap was below `tokens`: the answer stops there, as an engine's
    /// does (`length`, Anthropic's `max_tokens`).
    capped: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Content {
    #[default]
    Plain,
    CarriageReturn,
    ForgedDone,
}

impl Script {
    /// Holds the answer to the request's output cap (`max_completion_tokens`, else
    /// `max_tokens`), as vLLM, OpenAI and Anthropic do.
    fn cap_at(&mut self, req: &Value) {
        let cap = req["max_completion_tokens"]
            .as_u64()
            .or(req["max_tokens"].as_u64());
        if let Some(cap) = cap.map(|c| c as usize)
            && cap < self.tokens
        {
            self.tokens = cap;
            self.capped = true;
        }
    }

    /// The OpenAI finish reason of an answer that ran to its end.
    fn finish(&self) -> &'static str {
        if self.capped { "length" } else { "stop" }
    }

    /// Waits the scripted time to the first token (`ttft_ms`), and counts it as the engine's
    /// time to first token.
    async fn wait_first_token(&self, stats: &MockStats) {
        if !self.ttft.is_zero() {
            tokio::time::sleep(self.ttft).await;
        }
        stats
            .ttft
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(self.ttft);
    }

    /// The request's script: the `x-mock-script` header, else what follows `@` in the model.
    fn of(headers: &HeaderMap, model: &str, default: &str) -> Result<Self, String> {
        match headers.get("x-mock-script").and_then(|v| v.to_str().ok()) {
            Some(text) => Self::parse(text),
            None => Self::parse(model.split_once('@').map_or(default, |(_, s)| s)),
        }
    }

    /// What happens before content token `emitted` of a stream: the inter-token delay, then a
    /// scripted stall (never returns) or cut (`Some`: the error that ends the body).
    async fn before_token(&self, emitted: usize) -> Option<std::io::Error> {
        // Time passes before each token, faults included, as on a real server.
        if emitted > 0 && !self.itl.is_zero() {
            tokio::time::sleep(self.itl).await;
        }
        if self.stall_after == Some(emitted) {
            std::future::pending::<()>().await;
        }
        (self.close_after == Some(emitted))
            .then(|| std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "scripted close"))
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut s = Self {
            tokens: 8,
            rounds: 1,
            ..Self::default()
        };
        for pair in text
            .split([';', ','])
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair
                .split_once(['=', ':'])
                .ok_or_else(|| format!("mock script: {pair:?} is not key=value"))?;
            let n = || {
                v.parse::<u64>()
                    .map_err(|_| format!("mock script: {k} needs a number, got {v:?}"))
            };
            match k {
                "tokens" => s.tokens = n()? as usize,
                "ttft_ms" => s.ttft = Duration::from_millis(n()?),
                "itl_ms" => s.itl = Duration::from_millis(n()?),
                "fail" => s.fail = Some(n()? as u16),
                "fail_after" => s.fail_after = Some(n()? as usize),
                "close_after" => s.close_after = Some(n()? as usize),
                "stall_after" => s.stall_after = Some(n()? as usize),
                "cached" => s.cached = n()? as usize,
                "tool" => s.tool = Some(v.to_owned()),
                "rounds" => s.rounds = n()? as usize,
                "content" => {
                    s.content = match v {
                        "cr" => Content::CarriageReturn,
                        "done" => Content::ForgedDone,
                        "plain" => Content::Plain,
                        _ => return Err(format!("mock script: unknown content {v:?}")),
                    }
                }
                "flavor" => {
                    s.flavor = Some(match v {
                        "vllm" => Flavor::Vllm,
                        "openai" => Flavor::OpenAi,
                        "anthropic" => Flavor::Anthropic,
                        _ => return Err(format!("mock script: unknown flavor {v:?}")),
                    })
                }
                _ => return Err(format!("mock script: unknown key {k:?}")),
            }
        }
        Ok(s)
    }

    fn token(&self, i: usize) -> String {
        match self.content {
            Content::Plain => format!("tok{i} "),
            Content::CarriageReturn => format!("line{i}\r\n"),
            Content::ForgedDone => "\n\ndata: [DONE]\n\n".to_owned(),
        }
    }
}

fn error_body(flavor: Flavor, status: u16, message: &str) -> String {
    match flavor {
        Flavor::Anthropic => {
            let ty = match status {
                400 | 409 | 422 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": ty, "message": message},
                   "request_id": "req_mock"})
            .to_string()
        }
        Flavor::OpenAi => {
            let (ty, code) = match status {
                400 => ("invalid_request_error", "invalid_value"),
                401 => ("invalid_request_error", "invalid_api_key"),
                404 => ("invalid_request_error", "model_not_found"),
                429 => ("requests", "rate_limit_exceeded"),
                _ => ("server_error", "server_error"),
            };
            json!({"error": {"message": message, "type": ty, "param": null, "code": code}})
                .to_string()
        }
        Flavor::Vllm => {
            let ty = match status {
                400 => "BadRequestError",
                404 => "NotFoundError",
                _ => "InternalServerError",
            };
            json!({"error": {"message": message, "type": ty, "param": null, "code": status}})
                .to_string()
        }
    }
}

fn error_response(flavor: Flavor, status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        error_body(flavor, status, message),
    )
        .into_response();
    if matches!(status, 429 | 503 | 529) {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    resp
}

/// A missing or wrong key, answered as the server does: OpenAI's error object, or vLLM's flat
/// `{"error":"Unauthorized"}` (its `--api-key` check).
fn unauthorized(flavor: Flavor, key: Option<&str>, headers: &HeaderMap) -> Option<Response> {
    let key = key?;
    let sent = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if sent == Some(key) {
        return None;
    }
    let body = match (flavor, sent) {
        (Flavor::Vllm, _) => json!({"error": "Unauthorized"}).to_string(),
        (_, None) => json!({"error": {
            "message": "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "type": "invalid_request_error", "param": null, "code": null}})
        .to_string(),
        (_, Some(_)) => json!({"error": {
            "message": "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})
        .to_string(),
    };
    Some(
        (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
    )
}

/// The chat request fields OpenAI accepts; anything else is refused there (vLLM ignores it).
const OPENAI_CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "metadata",
    "modalities",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "stop",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "user",
    "verbosity",
    "web_search_options",
];

/// What the real server refuses in a chat request, as (param, message): a role it does not
/// know, a number out of its range, `stream_options` without `stream`, and (OpenAI) an unknown
/// field.
fn invalid_chat(flavor: Flavor, req: &Value) -> Option<(Option<String>, String)> {
    let roles = [
        "system",
        "developer",
        "user",
        "assistant",
        "tool",
        "function",
    ];
    if let Some(messages) = req["messages"].as_array() {
        for (i, m) in messages.iter().enumerate() {
            let role = m["role"].as_str().unwrap_or_default();
            if !roles.contains(&role) {
                return Some((
                    Some(format!("messages[{i}].role")),
                    format!(
                        "Invalid value: '{role}'. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', and 'developer'."
                    ),
                ));
            }
        }
    }
    let ranges: [(&str, f64, f64); 6] = [
        ("temperature", 0.0, 2.0),
        ("top_p", 0.0, 1.0),
        ("presence_penalty", -2.0, 2.0),
        ("frequency_penalty", -2.0, 2.0),
        ("n", 1.0, 128.0),
        ("max_tokens", 1.0, f64::MAX),
    ];
    for (field, min, max) in ranges {
        let Some(v) = req[field].as_f64() else {
            continue;
        };
        if v < min {
            return Some((
                Some(field.into()),
                format!(
                    "Invalid '{field}': value below minimum. Expected a value >= {min}, but got {v} instead."
                ),
            ));
        }
        if v > max {
            return Some((
                Some(field.into()),
                format!(
                    "Invalid '{field}': value above maximum. Expected a value <= {max}, but got {v} instead."
                ),
            ));
        }
    }
    let streaming = req["stream"].as_bool().unwrap_or(false);
    if !req["stream_options"].is_null() && !streaming {
        let message = match flavor {
            Flavor::Vllm => "Stream options can only be defined when `stream=True`.",
            _ => "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        };
        return Some((Some("stream_options".into()), message.into()));
    }
    if flavor == Flavor::OpenAi
        && let Some(fields) = req.as_object()
        && let Some(unknown) = fields
            .keys()
            .find(|k| !OPENAI_CHAT_FIELDS.contains(&k.as_str()))
    {
        return Some((
            None,
            format!("Unrecognized request argument supplied: {unknown}"),
        ));
    }
    None
}

/// A 400 naming `param`, in the flavor's error body.
fn invalid(flavor: Flavor, param: Option<&str>, message: &str) -> Response {
    let body = match flavor {
        Flavor::OpenAi => json!({"error": {"message": message, "type": "invalid_request_error",
                                           "param": param, "code": param.map(|_| "invalid_value")}})
        .to_string(),
        _ => error_body(flavor, 400, message),
    };
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn chat(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        s.stats
            .traceparents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(tp.to_owned());
    }
    let arrived = s.stats.minute_now();
    s.stats.requests.fetch_add(1, SeqCst);
    s.maybe_hang().await;
    let flavor_default = s.opts.flavor;
    if let Some(refused) = unauthorized(flavor_default, s.opts.api_key.as_deref(), &headers) {
        return refused;
    }
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error_response(flavor_default, 400, &format!("invalid JSON: {e}")),
    };
    s.stats
        .output_caps
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(
            req["max_completion_tokens"]
                .as_u64()
                .or(req["max_tokens"].as_u64()),
        );
    if let Some((param, message)) = invalid_chat(flavor_default, &req) {
        return invalid(flavor_default, param.as_deref(), &message);
    }
    let model = req["model"].as_str().unwrap_or_default().to_owned();
    if s.opts.strict_models && !s.serves(&model) {
        return error_response(
            flavor_default,
            404,
            &format!("The model `{model}` does not exist."),
        );
    }
    let mut script = match Script::of(&headers, &model, &s.opts.default_script) {
        Ok(s) => s,
        Err(e) => return error_response(flavor_default, 400, &e),
    };
    script.cap_at(&req);
    let flavor = script.flavor.unwrap_or(flavor_default);
    if let Some(status) = script.fail {
        s.stats.failed.fetch_add(1, SeqCst);
        return error_response(flavor, status, &format!("scripted failure {status}"));
    }
    let prompt_tokens = req["messages"].as_array().map_or(0, |m| {
        m.iter()
            .map(|m| {
                m["content"]
                    .as_str()
                    .map_or(1, |c| c.split_whitespace().count() + 1)
            })
            .sum::<usize>()
    });
    let stream = req["stream"].as_bool().unwrap_or(false);
    let include_usage = req["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let id = format!("chatcmpl-mock{}", s.stats.requests.load(SeqCst));
    let results = req["messages"]
        .as_array()
        .map_or(0, |m| m.iter().filter(|m| m["role"] == "tool").count());
    if let Some(tool) = script.tool.as_deref().filter(|_| results < script.rounds) {
        s.stats.completed.fetch_add(1, SeqCst);
        let call = ToolCall {
            id: &id,
            model: &model,
            tool,
            round: results,
            prompt_tokens,
        };
        return if stream {
            call.stream(include_usage)
        } else {
            call.whole()
        };
    }
    if !stream {
        script.wait_first_token(&s.stats).await;
        let text: String = (0..script.tokens).map(|i| script.token(i)).collect();
        let n = req["n"].as_u64().unwrap_or(1).max(1) as usize;
        let completion_tokens = script.tokens * n;
        s.stats
            .served(arrived, prompt_tokens as u64, completion_tokens as u64);
        s.stats.served_user(
            req["user"].as_str(),
            (prompt_tokens + completion_tokens) as u64,
        );
        s.stats.completed.fetch_add(1, SeqCst);
        let choices: Vec<Value> = (0..n)
            .map(|index| json!({"index": index, "message": {"role": "assistant", "content": text, "refusal": null, "annotations": []},
                                "logprobs": null, "finish_reason": script.finish()}))
            .collect();
        let body = json!({
            "id": id, "object": "chat.completion", "created": 1763700000, "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": 0}},
            "service_tier": "default", "system_fingerprint": "fp_mock"
        });
        return json_response(&body);
    }
    if include_usage {
        s.stats.usage_requested.fetch_add(1, SeqCst);
    }
    let guard = StreamGuard::start(&s.stats);
    let plan = StreamPlan {
        script,
        flavor,
        id,
        model,
        include_usage,
        prompt_tokens,
        arrived,
        step: 0,
        guard,
    };
    sse_response(futures::stream::unfold(plan, StreamPlan::next))
}

/// A chat answer that calls a tool (OpenAI's shape: `tool_calls`, no content).
struct ToolCall<'a> {
    id: &'a str,
    model: &'a str,
    tool: &'a str,
    round: usize,
    prompt_tokens: usize,
}

impl ToolCall<'_> {
    const ARGUMENTS: [&'static str; 2] = ["{\"q\": ", "\"x\"}"];

    fn call_id(&self) -> String {
        format!("call_mock{}", self.round)
    }

    fn usage(&self) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": 5,
               "total_tokens": self.prompt_tokens + 5})
    }

    fn whole(&self) -> Response {
        json_response(&json!({
            "id": self.id, "object": "chat.completion", "created": 1763700000, "model": self.model,
            "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": null, "message": {
                "role": "assistant", "content": null, "refusal": null,
                "tool_calls": [{"id": self.call_id(), "type": "function",
                                "function": {"name": self.tool, "arguments": Self::ARGUMENTS.concat()}}]}}],
            "usage": self.usage(),
        }))
    }

    /// The call streamed as OpenAI does: the id and name first, the arguments in pieces.
    fn stream(&self, include_usage: bool) -> Response {
        let chunk = |delta: Value, finish: Value| {
            json!({"id": self.id, "object": "chat.completion.chunk", "created": 1763700000,
                   "model": self.model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        };
        let mut frames = vec![
            chunk(json!({"role": "assistant", "content": null}), Value::Null),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": self.call_id(), "type": "function",
                                       "function": {"name": self.tool, "arguments": ""}}]}),
                Value::Null,
            ),
        ];
        for part in Self::ARGUMENTS {
            frames.push(chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}),
                Value::Null,
            ));
        }
        frames.push(chunk(json!({}), json!("tool_calls")));
        if include_usage {
            let mut last = chunk(json!({}), Value::Null);
            last["choices"] = json!([]);
            last["usage"] = self.usage();
            frames.push(last);
        }
        let mut body: Vec<Result<Bytes, std::io::Error>> = frames
            .into_iter()
            .map(|f| Ok(Bytes::from(format!("data: {f}\n\n"))))
            .collect();
        body.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
        sse_response(futures::stream::iter([body]))
    }
}

/// A whole JSON answer (a non-streamed completion or message).
fn json_response(body: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A streamed answer: the frames of `steps` (each step's, in order) as an SSE body.
fn sse_response<S>(steps: S) -> Response
where
    S: futures::Stream<Item = Vec<Result<Bytes, std::io::Error>>> + Send + 'static,
{
    let body = Body::from_stream(steps.flat_map(futures::stream::iter));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Still running; if the body is dropped now, the client went away.
    Open,
    Completed,
    /// A scripted failure ended it.
    Failed,
}

/// Counts a stream by how it ended, when its body is dropped.
struct StreamGuard {
    stats: Arc<MockStats>,
    end: End,
    /// Content tokens handed to the body so far.
    sent: u64,
}

/// What a stream sends for one content token.
enum TokenStep {
    /// The script cuts the body here; the error ends it.
    Cut(std::io::Error),
    /// The script fails the stream here, with its flavor's in-stream error.
    Fail,
    /// The token's text.
    Token(String),
}

impl StreamGuard {
    /// Content token `emitted` of `script`'s stream, after its delay; a cut or a scripted
    /// failure ends the stream as failed.
    async fn token(&mut self, script: &Script, emitted: usize) -> TokenStep {
        if let Some(err) = script.before_token(emitted).await {
            self.end = End::Failed;
            return TokenStep::Cut(err);
        }
        if script.fail_after == Some(emitted) {
            self.end = End::Failed;
            return TokenStep::Fail;
        }
        self.sent += 1;
        TokenStep::Token(script.token(emitted))
    }

    /// The stream ended as it should, having served `tokens` for `prompt_tokens`.
    fn completed(&mut self, arrived: u64, prompt_tokens: usize, tokens: usize) {
        self.stats
            .served(arrived, prompt_tokens as u64, tokens as u64);
        self.end = End::Completed;
    }

    /// The step a stream takes now (counted in `step`, from 0), or `None` once it has ended.
    fn next_step(&self, step: &mut usize) -> Option<usize> {
        if self.end != End::Open {
            return None;
        }
        *step += 1;
        Some(*step - 1)
    }

    /// Counts a stream as running until the guard is dropped.
    fn start(stats: &Arc<MockStats>) -> Self {
        stats.running.fetch_add(1, SeqCst);
        Self {
            stats: Arc::clone(stats),
            end: End::Open,
            sent: 0,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.stats.running.fetch_sub(1, SeqCst);
        if self.end == End::Open {
            self.stats.aborted_tokens.fetch_add(self.sent, SeqCst);
        }
        let counter = match self.end {
            End::Open => &self.stats.aborted,
            End::Completed => &self.stats.completed,
            End::Failed => &self.stats.failed,
        };
        counter.fetch_add(1, SeqCst);
    }
}

/// A streamed answer. It carries one choice whatever `n` asks (a real server streams `n`,
/// told apart by `index`; the non-streamed answer here has all `n`).
struct StreamPlan {
    script: Script,
    flavor: Flavor,
    id: String,
    model: String,
    include_usage: bool,
    prompt_tokens: usize,
    arrived: u64,
    step: usize,
    guard: StreamGuard,
}

impl StreamPlan {
    fn chunk(&self, delta: &str, finish: Option<&str>) -> Bytes {
        let usage = match (self.flavor, self.include_usage) {
            (Flavor::OpenAi, true) => r#","usage":null"#,
            _ => "",
        };
        let finish = finish.map_or("null".to_owned(), |f| format!("\"{f}\""));
        Bytes::from(format!(
            "data: {{\"id\":\"{}\",\"object\":\"chat.completion.chunk\",\"created\":1763700000,\"model\":{},\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]{usage}}}\n\n",
            self.id,
            Value::String(self.model.clone()),
        ))
    }

    /// Emits the next group of frames. Step 0: role chunk; 1..=tokens: content; then the
    /// finish chunk, the usage chunk (if asked) and `[DONE]`.
    async fn next(mut self) -> Option<(Vec<Result<Bytes, std::io::Error>>, Self)> {
        let step = self.guard.next_step(&mut self.step)?;
        let n = self.script.tokens;
        if step == 0 {
            self.script.wait_first_token(&self.guard.stats).await;
            let first = self.chunk(r#"{"role":"assistant","content":""}"#, None);
            return Some((vec![Ok(first)], self));
        }
        let emitted = step - 1;
        if emitted < n {
            let frames = match self.guard.token(&self.script, emitted).await {
                TokenStep::Cut(err) => vec![Err(err)],
                TokenStep::Fail => {
                    let body = error_body(self.flavor, 500, "scripted mid-stream failure");
                    vec![
                        Ok(Bytes::from(format!("data: {body}\n\n"))),
                        Ok(Bytes::from_static(b"data: [DONE]\n\n")),
                    ]
                }
                TokenStep::Token(text) => {
                    let delta = json!({ "content": text }).to_string();
                    vec![Ok(self.chunk(&delta, None))]
                }
            };
            return Some((frames, self));
        }
        if emitted == n {
            let mut frames = vec![Ok(self.chunk("{}", Some(self.script.finish())))];
            if self.include_usage {
                frames.push(Ok(Bytes::from(format!(
                    "data: {{\"id\":\"{}\",\"object\":\"chat.completion.chunk\",\"created\":1763700000,\"model\":{},\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{n},\"total_tokens\":{t},\"prompt_tokens_details\":{{\"cached_tokens\":0}}}}}}\n\n",
                    self.id,
                    Value::String(self.model.clone()),
                    p = self.prompt_tokens,
                    t = self.prompt_tokens + n,
                ))));
            }
            frames.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
            self.guard.completed(self.arrived, self.prompt_tokens, n);
            return Some((frames, self));
        }
        None
    }
}

async fn models(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    // vLLM's key check covers every path under /v1.
    if let Some(refused) = unauthorized(Flavor::Vllm, s.opts.api_key.as_deref(), &headers) {
        return refused;
    }
    let m = &s.opts.served_model;
    let base = |id: &str| {
        json!({"id": id, "object": "model", "created": 1763700000, "owned_by": "vllm",
               "root": format!("/models/{m}"), "parent": null, "max_model_len": 8192,
               "permission": []})
    };
    let mut data = vec![base(m)];
    data.extend(s.opts.aliases.iter().map(|a| base(a)));
    data.extend(s.adapters().iter().map(|(name, path)| {
        json!({"id": name, "object": "model", "created": 1763700000, "owned_by": "vllm",
               "root": path, "parent": m, "max_model_len": null, "permission": []})
    }));
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// Why a LoRA request is refused before its body is read: the caller is not let in, or
/// runtime LoRA updating is off (vLLM's 404).
fn lora_refused(s: &Shared, headers: &HeaderMap) -> Option<Response> {
    if let Some(refused) = unauthorized(Flavor::Vllm, s.opts.api_key.as_deref(), headers) {
        return Some(refused);
    }
    (!s.opts.lora_runtime).then(|| error_response(Flavor::Vllm, 404, "Not Found"))
}

/// `POST /v1/load_lora_adapter` (only with runtime LoRA updating): 200 with vLLM's plain-text
/// success line, 400 `InvalidUserInput` for missing fields or a name already loaded.
async fn load_lora(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = lora_refused(&s, &headers) {
        return refused;
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (Some(name), Some(path)) = (req["lora_name"].as_str(), req["lora_path"].as_str()) else {
        return lora_error(
            400,
            "InvalidUserInput",
            "Both 'lora_name' and 'lora_path' must be provided.",
        );
    };
    if !std::path::Path::new(path).exists() {
        // vLLM loads the adapter to check it: nothing at the path is its 404.
        return lora_error(
            404,
            "NotFoundError",
            &format!("Loading lora {name} failed: No adapter found for {path}"),
        );
    }
    let mut adapters = s.adapters();
    if adapters.iter().any(|(n, _)| n == name) {
        return lora_error(
            400,
            "InvalidUserInput",
            &format!("The lora adapter '{name}' has already been loaded."),
        );
    }
    adapters.push((name.to_owned(), path.to_owned()));
    (
        StatusCode::OK,
        format!("Success: LoRA adapter '{name}' added successfully."),
    )
        .into_response()
}

/// `POST /v1/unload_lora_adapter`: 404 `NotFoundError` when it is not loaded.
async fn unload_lora(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = lora_refused(&s, &headers) {
        return refused;
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(name) = req["lora_name"].as_str() else {
        return lora_error(
            400,
            "InvalidUserInput",
            "'lora_name' needs to be provided to unload a LoRA adapter.",
        );
    };
    let mut adapters = s.adapters();
    let before = adapters.len();
    adapters.retain(|(n, _)| n != name);
    if adapters.len() == before {
        return lora_error(
            404,
            "NotFoundError",
            &format!("The lora adapter '{name}' cannot be found."),
        );
    }
    (
        StatusCode::OK,
        format!("Success: LoRA adapter '{name}' removed successfully."),
    )
        .into_response()
}

fn lora_error(status: u16, ty: &str, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"error": {"message": message, "type": ty, "param": null, "code": status}})
            .to_string(),
    )
        .into_response()
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let m = &s.opts.served_model;
    let st = &s.stats;
    let text = format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"{m}\"}} {running}.0\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"{m}\"}} 0.0\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"{m}\"}} {kv}\n\
         # HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n\
         # TYPE vllm:prompt_tokens_total counter\n\
         vllm:prompt_tokens_total{{engine=\"0\",model_name=\"{m}\"}} {prompt}.0\n\
         # HELP vllm:generation_tokens_total Number of generation tokens processed.\n\
         # TYPE vllm:generation_tokens_total counter\n\
         vllm:generation_tokens_total{{engine=\"0\",model_name=\"{m}\"}} {gen}.0\n\
         # HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.\n\
         # TYPE vllm:prefix_cache_queries_total counter\n\
         vllm:prefix_cache_queries_total{{engine=\"0\",model_name=\"{m}\"}} {prompt}.0\n\
         # HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.\n\
         # TYPE vllm:prefix_cache_hits_total counter\n\
         vllm:prefix_cache_hits_total{{engine=\"0\",model_name=\"{m}\"}} 0.0\n{ttft}",
        running = st.running.load(SeqCst),
        kv = (st.running.load(SeqCst) as f64 / 256.0).min(1.0),
        prompt = st.prompt_tokens.load(SeqCst),
        gen = st.completion_tokens.load(SeqCst),
        ttft = st.ttft.lock().unwrap_or_else(|p| p.into_inner()).exposition(m),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Words of an Anthropic `content` (a string or text blocks) plus one per message: the mock's
/// tokenizer.
fn anthropic_tokens(content: &Value) -> usize {
    let words = match content {
        Value::String(t) => t.split_whitespace().count(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .map(|t| t.split_whitespace().count())
            .sum(),
        _ => 0,
    };
    words + 1
}

/// `POST /v1/messages`: validates what the real API validates (headers, `max_tokens`, roles,
/// temperature range) and answers in its format.
async fn messages(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = s.stats.minute_now();
    s.stats.requests.fetch_add(1, SeqCst);
    let f = Flavor::Anthropic;
    if headers.get("x-api-key").is_none_or(|v| v.is_empty()) {
        return error_response(f, 401, "x-api-key header is required");
    }
    if headers.get("anthropic-version").is_none() {
        return error_response(f, 400, "anthropic-version: header is required");
    }
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error_response(f, 400, &format!("invalid JSON: {e}")),
    };
    {
        // As received, with the beta features asked for (kept under a key of the mock's own).
        let mut seen = req.clone();
        if let Some(beta) = headers.get("anthropic-beta").and_then(|v| v.to_str().ok()) {
            seen["(anthropic-beta)"] = beta.into();
        }
        *s.stats
            .last_request
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(seen);
    }
    let model = req["model"].as_str().unwrap_or_default().to_owned();
    if model.is_empty() {
        return error_response(f, 400, "model: Field required");
    }
    if req["max_tokens"].as_u64().is_none_or(|n| n == 0) {
        return error_response(f, 400, "max_tokens: Field required");
    }
    if req["temperature"]
        .as_f64()
        .is_some_and(|t| !(0.0..=1.0).contains(&t))
    {
        return error_response(
            f,
            400,
            "temperature: Input should be less than or equal to 1",
        );
    }
    let Some(msgs) = req["messages"].as_array().filter(|m| !m.is_empty()) else {
        return error_response(f, 400, "messages: Field required");
    };
    for (i, m) in msgs.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        if role != "user" && role != "assistant" {
            return error_response(
                f,
                400,
                &format!("messages.{i}.role: Input should be 'user' or 'assistant'"),
            );
        }
    }
    for key in req.as_object().map(|o| o.keys()).into_iter().flatten() {
        let known = [
            "model",
            "max_tokens",
            "messages",
            "system",
            "stream",
            "metadata",
            "stop_sequences",
            "temperature",
            "top_p",
            "top_k",
            "tools",
            "tool_choice",
            "thinking",
            "service_tier",
        ];
        if !known.contains(&key.as_str()) {
            return error_response(f, 400, &format!("{key}: Extra inputs are not permitted"));
        }
    }
    let mut script = match Script::of(&headers, &model, &s.opts.default_script) {
        Ok(s) => s,
        Err(e) => return error_response(f, 400, &e),
    };
    script.cap_at(&req);
    if let Some(status) = script.fail {
        s.stats.failed.fetch_add(1, SeqCst);
        return error_response(f, status, &format!("scripted failure {status}"));
    }
    let prompt_tokens = msgs
        .iter()
        .map(|m| anthropic_tokens(&m["content"]))
        .sum::<usize>()
        + req.get("system").map_or(0, anthropic_tokens);
    let cached = script.cached.min(prompt_tokens);
    let id = format!("msg_mock{}", s.stats.requests.load(SeqCst));
    let stream = req["stream"].as_bool().unwrap_or(false);
    if !stream {
        script.wait_first_token(&s.stats).await;
        let text: String = (0..script.tokens).map(|i| script.token(i)).collect();
        let mut content = vec![json!({"type": "text", "text": text})];
        let mut stop = if script.capped {
            "max_tokens"
        } else {
            "end_turn"
        };
        if let Some(tool) = &script.tool {
            content.push(
                json!({"type": "tool_use", "id": "toolu_mock", "name": tool, "input": {"q": "x"}}),
            );
            stop = "tool_use";
        }
        s.stats
            .served(arrived, prompt_tokens as u64, script.tokens as u64);
        s.stats.completed.fetch_add(1, SeqCst);
        let body = json!({
            "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop, "stop_sequence": null,
            "usage": {"input_tokens": prompt_tokens - cached, "output_tokens": script.tokens,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
                      "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                      "service_tier": "standard"}
        });
        return json_response(&body);
    }
    let plan = AnthropicPlan {
        script,
        id,
        model,
        prompt_tokens,
        cached,
        arrived,
        step: 0,
        guard: StreamGuard::start(&s.stats),
    };
    sse_response(futures::stream::unfold(plan, AnthropicPlan::next))
}

struct AnthropicPlan {
    script: Script,
    id: String,
    model: String,
    prompt_tokens: usize,
    cached: usize,
    arrived: u64,
    step: usize,
    guard: StreamGuard,
}

fn event(name: &str, data: &Value) -> Result<Bytes, std::io::Error> {
    Ok(Bytes::from(format!("event: {name}\ndata: {data}\n\n")))
}

impl AnthropicPlan {
    /// Step 0: message_start, content_block_start and a ping; 1..=tokens: text deltas; then
    /// content_block_stop, an optional tool_use block, message_delta and message_stop.
    async fn next(mut self) -> Option<(Vec<Result<Bytes, std::io::Error>>, Self)> {
        let step = self.guard.next_step(&mut self.step)?;
        let n = self.script.tokens;
        if step == 0 {
            self.script.wait_first_token(&self.guard.stats).await;
            let start = json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.prompt_tokens - self.cached,
                          "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": self.cached, "output_tokens": 1}}});
            return Some((
                vec![
                    event("message_start", &start),
                    event(
                        "content_block_start",
                        &json!({"type": "content_block_start", "index": 0,
                                "content_block": {"type": "text", "text": ""}}),
                    ),
                    event("ping", &json!({"type": "ping"})),
                ],
                self,
            ));
        }
        let emitted = step - 1;
        if emitted < n {
            let frame = match self.guard.token(&self.script, emitted).await {
                TokenStep::Cut(err) => Err(err),
                TokenStep::Fail => {
                    let body: Value =
                        serde_json::from_str(&error_body(Flavor::Anthropic, 529, "Overloaded"))
                            .unwrap_or_default();
                    event("error", &body)
                }
                TokenStep::Token(text) => {
                    let delta = json!({"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": text}});
                    event("content_block_delta", &delta)
                }
            };
            return Some((vec![frame], self));
        }
        if emitted == n {
            let mut frames = vec![event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": 0}),
            )];
            let mut stop = if self.script.capped {
                "max_tokens"
            } else {
                "end_turn"
            };
            if let Some(tool) = &self.script.tool {
                stop = "tool_use";
                frames.extend([
                    event(
                        "content_block_start",
                        &json!({"type": "content_block_start", "index": 1, "content_block":
                                {"type": "tool_use", "id": "toolu_mock", "name": tool, "input": {}}}),
                    ),
                    event(
                        "content_block_delta",
                        &json!({"type": "content_block_delta", "index": 1,
                                "delta": {"type": "input_json_delta", "partial_json": "{\"q\":"}}),
                    ),
                    event(
                        "content_block_delta",
                        &json!({"type": "content_block_delta", "index": 1,
                                "delta": {"type": "input_json_delta", "partial_json": "\"x\"}"}}),
                    ),
                    event(
                        "content_block_stop",
                        &json!({"type": "content_block_stop", "index": 1}),
                    ),
                ]);
            }
            frames.push(event(
                "message_delta",
                &json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                        "usage": {"output_tokens": n}}),
            ));
            frames.push(event("message_stop", &json!({"type": "message_stop"})));
            self.guard.completed(self.arrived, self.prompt_tokens, n);
            return Some((frames, self));
        }
        None
    }
}
