//! Meridian's test support: the mock upstream, an in-process node harness, the multi-process
//! cluster harness ([`procs`]), and helpers.
//! The integration tests live in `tests/tests/`; the load benchmark in `src/bin/bench-gateway.rs`.

pub mod big_state;
pub mod chat_requests;
pub mod engine;
pub mod installs;
pub mod json_api;
pub mod mock;
pub mod otlp;
pub mod procs;
pub mod serve;
pub mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use meridian_actors::Gateway;
use meridian_actors::upstream::sse::{SseEvent, SseParser};
use meridian_node::config;
use meridian_node::{App, AppError};
use meridian_policy::clock::WallClock;
use meridian_proto::pb::admin::{self as pb, admin_client::AdminClient};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A node running in this process on loopback ports picked by the OS.
pub struct TestNode {
    pub http: SocketAddr,
    /// The node's data directory (Raft log and snapshots), removed with the node.
    pub data: Option<tempfile::TempDir>,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub gateway: Gateway,
    /// The node's vLLM replicas.
    pub vllm: meridian_actors::vllm::supervisor::Vllm,
    /// The development API key the node made on first start (`None` with auth off).
    pub api_key: Option<String>,
    /// What the admin API requires.
    pub admin_token: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), AppError>>>,
}

impl TestNode {
    /// Starts a node from TOML text; its listeners are moved to port 0 through the
    /// `MERIDIAN_…` overrides, the way an operator would.
    pub async fn start(toml: &str) -> anyhow::Result<Self> {
        Self::start_with_env(toml, Vec::new()).await
    }

    pub async fn start_with_env(toml: &str, env: Vec<(String, String)>) -> anyhow::Result<Self> {
        Self::start_on(toml, env, WallClock::system()).await
    }

    /// [`TestNode::start_with_env`] on `clock`: the node places its windows and stamps its
    /// Raft proposals by it (e.g. [`clock_inside_one_minute`]'s).
    pub async fn start_on(
        toml: &str,
        mut env: Vec<(String, String)>,
        clock: WallClock,
    ) -> anyhow::Result<Self> {
        for section in ["HTTP", "GRPC", "ADMIN"] {
            env.push((format!("MERIDIAN_{section}__LISTEN"), "127.0.0.1:0".into()));
        }
        let data = tempfile::tempdir()?;
        env.push((
            "MERIDIAN_NODE__DATA_DIR".into(),
            data.path().display().to_string(),
        ));
        // Loopback Raft timings, so a node leads its own cluster at once.
        env.push(("MERIDIAN_CLUSTER__HEARTBEAT".into(), "50ms".into()));
        env.push((
            "MERIDIAN_CLUSTER__ELECTION_TIMEOUT_MIN".into(),
            "150ms".into(),
        ));
        env.push((
            "MERIDIAN_CLUSTER__ELECTION_TIMEOUT_MAX".into(),
            "300ms".into(),
        ));
        let mut config = config::load(Some(toml), &env)?;
        config.quota.clock = clock;
        let mut node = Self::start_config(config).await?;
        node.data = Some(data);
        Ok(node)
    }

    pub async fn start_config(config: meridian_node::Config) -> anyhow::Result<Self> {
        let app = App::build(config).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (http, grpc, admin) = (app.http_addr(), app.grpc_addr(), app.admin_addr());
        let gateway = app.gateway().clone();
        let vllm = app.vllm().clone();
        let api_key = app.first_start().dev_key.clone();
        let admin_token = app.admin_token().to_owned();
        let task = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            http,
            data: None,
            grpc,
            admin,
            gateway,
            vllm,
            api_key,
            admin_token,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// An HTTP client that sends this node's development API key on every request.
    pub fn client(&self) -> reqwest::Client {
        let mut headers = http::HeaderMap::new();
        if let Some(key) = &self.api_key
            && let Ok(v) = format!("Bearer {key}").parse()
        {
            headers.insert(http::header::AUTHORIZATION, v);
        }
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap_or_default()
    }

    /// `GET path` on this node with its development API key.
    pub async fn get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.client().get(self.url(path)).send().await
    }

    /// `GET path` on this node, its body read as JSON.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        Ok(self.get(path).await?.json().await?)
    }

    /// A `POST /v1/chat/completions` to this node with its development API key, for the caller
    /// to finish (headers, body) and send.
    pub fn chat_request(&self) -> reqwest::RequestBuilder {
        self.client().post(self.url("/v1/chat/completions"))
    }

    /// Sends the JSON text `body` to this node's `/v1/chat/completions` with its development
    /// API key.
    pub async fn post_chat(&self, body: String) -> reqwest::Result<reqwest::Response> {
        self.chat_request()
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
    }

    /// The node's `/metrics` text (empty if it cannot be had).
    pub async fn metrics(&self) -> String {
        match self.get("/metrics").await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Sends this node's development API key on gRPC calls (nothing with auth off).
    pub fn key_bearer(&self) -> Bearer {
        Bearer::new(self.api_key.as_deref())
    }

    /// Sends this node's admin token on admin API calls.
    pub fn admin_bearer(&self) -> Bearer {
        Bearer::new(Some(&self.admin_token))
    }

    /// Creates (or updates) `tier` through the admin API.
    pub async fn put_tier(&self, tier: pb::Tier) -> anyhow::Result<()> {
        self.admin_client()
            .await?
            .put_tier(pb::PutTierRequest { tier: Some(tier) })
            .await?;
        Ok(())
    }

    /// Creates (or updates) `tenant` through the admin API and makes an API key for it.
    pub async fn tenant_with_key(&self, tenant: pb::Tenant) -> anyhow::Result<String> {
        let mut admin = self.admin_client().await?;
        let id = tenant.id.clone();
        admin
            .put_tenant(pb::PutTenantRequest {
                tenant: Some(tenant),
            })
            .await?;
        Ok(admin
            .create_api_key(pb::CreateApiKeyRequest {
                tenant: id,
                label: String::new(),
            })
            .await?
            .into_inner()
            .secret)
    }

    /// Creates tier `tier_name` with `limits` and tenant `id` on it, and makes the tenant an API
    /// key (returned).
    pub async fn tenant_in_tier(
        &self,
        id: &str,
        tier_name: &str,
        limits: pb::Limits,
    ) -> anyhow::Result<String> {
        self.put_tier(tier(tier_name, limits)).await?;
        self.tenant_with_key(tenant(id, tier_name)).await
    }

    /// An admin API client that sends the admin token.
    pub async fn admin_client(
        &self,
    ) -> anyhow::Result<AdminClient<InterceptedService<Channel, Bearer>>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.admin))?
            .connect()
            .await?;
        Ok(AdminClient::with_interceptor(channel, self.admin_bearer()))
    }

    /// Begins graceful shutdown; the returned handle resolves when the node has drained.
    pub fn begin_shutdown(&mut self) -> JoinHandle<Result<(), AppError>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task
            .take()
            .unwrap_or_else(|| tokio::spawn(async { Ok(()) }))
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A gRPC interceptor that adds `authorization: Bearer <token>` to every call (nothing when
/// there is no token, or it cannot be a header).
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Self {
        Self(token.and_then(|t| format!("Bearer {t}").parse().ok()))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A mock upstream of `flavor` and a node in front of it: provider `mock` serving `models`,
/// with `provider_extra` in the provider's section and `node_extra` (more sections) before it.
pub async fn node_with_mock(
    flavor: mock::Flavor,
    models: &[&str],
    provider_extra: &str,
    node_extra: &str,
) -> anyhow::Result<(mock::MockUpstream, TestNode)> {
    node_with_mock_on(
        flavor,
        models,
        provider_extra,
        node_extra,
        WallClock::system(),
    )
    .await
}

/// [`node_with_mock`] on `clock` (see [`TestNode::start_on`]).
pub async fn node_with_mock_on(
    flavor: mock::Flavor,
    models: &[&str],
    provider_extra: &str,
    node_extra: &str,
    clock: WallClock,
) -> anyhow::Result<(mock::MockUpstream, TestNode)> {
    let mock = mock::MockUpstream::with_flavor(flavor).await?;
    let kind = match flavor {
        mock::Flavor::OpenAi => "openai",
        mock::Flavor::Vllm => "vllm",
        mock::Flavor::Anthropic => "anthropic",
    };
    let toml = format!(
        "{node_extra}\n{}",
        provider_toml_kind("mock", kind, &mock.base_url(), models, provider_extra)
    );
    let node = TestNode::start_on(&toml, Vec::new(), clock).await?;
    Ok((mock, node))
}

/// A mock upstream (vLLM's flavour) and a node in front of it serving model `m`, priced at $2
/// per million input tokens and $8 per million output tokens; `provider_extra` goes in the
/// provider's section.
pub async fn node_with_priced_mock(
    provider_extra: &str,
) -> anyhow::Result<(mock::MockUpstream, TestNode)> {
    let prices = "[[prices]]\nmodel = \"m\"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\n";
    node_with_mock(mock::Flavor::Vllm, &["m"], provider_extra, prices).await
}

/// What `program args…` (run in `dir`, given `stdin`) printed; a failed run fails the test with
/// everything it printed. `package` is the Debian package that installs the program.
pub fn run_tool(
    program: &str,
    package: &str,
    args: &[&str],
    dir: Option<&std::path::Path>,
    stdin: Option<&[u8]>,
) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => panic!("{program} does not run ({e}): install Debian's `{package}` package"),
    };
    if let Some(mut input) = child.stdin.take()
        && let Some(bytes) = stdin
        && let Err(e) = input.write_all(bytes)
    {
        panic!("{program}'s input: {e}");
    }
    let out = match child.wait_with_output() {
        Ok(out) => out,
        Err(e) => panic!("{program}: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A tenant on `tier`, with nothing else set.
pub fn tenant(id: &str, tier: &str) -> pb::Tenant {
    pb::Tenant {
        id: id.into(),
        tier: tier.into(),
        ..pb::Tenant::default()
    }
}

/// Limits that set one field: `limit::requests_per_minute(2)`; more than one with struct
/// update syntax (`pb::Limits { tokens_per_minute: Some(9), ..limit::requests_per_minute(2) }`).
pub mod limit {
    use meridian_proto::pb::admin::Limits;

    fn only(set: impl FnOnce(&mut Limits)) -> Limits {
        let mut limits = Limits::default();
        set(&mut limits);
        limits
    }

    pub fn requests_per_minute(n: u64) -> Limits {
        only(|l| l.requests_per_minute = Some(n))
    }

    pub fn tokens_per_minute(n: u64) -> Limits {
        only(|l| l.tokens_per_minute = Some(n))
    }

    pub fn tokens_per_day(n: u64) -> Limits {
        only(|l| l.tokens_per_day = Some(n))
    }

    pub fn cost_per_day_micro_usd(n: u64) -> Limits {
        only(|l| l.cost_per_day_micro_usd = Some(n))
    }
}

/// Tier `name` with `limits` on each tenant's whole use (and none per user).
pub fn tier(name: &str, limits: pb::Limits) -> pb::Tier {
    pb::Tier {
        name: name.into(),
        limits: Some(limits),
        ..pb::Tier::default()
    }
}

/// A `POST {base}/v1/chat/completions` of the JSON text `body` with `key` as the bearer token
/// (`base`: a node's `http://host:port`), for the caller to send.
pub fn chat_as(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::RequestBuilder {
    client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
}

/// The value of the metric line that starts with `series` in node `url`'s `/metrics`.
pub async fn metric(url: &str, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Sends `req` and returns the answer's status, 0 when none came.
pub async fn status_of(req: reqwest::RequestBuilder) -> u16 {
    req.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// Asserts that `resp` is a `status` error that says when to retry (`Retry-After`), and
/// returns its body (which must be JSON).
pub async fn retry_later(resp: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status);
    assert!(resp.headers().contains_key("retry-after"));
    match resp.json().await {
        Ok(body) => body,
        Err(e) => panic!("a {status} without an OpenAI-style error body: {e}"),
    }
}

/// What the mock vLLM (`mock-vllm`) on loopback port `port` reports of itself (`/mock/stats`).
pub async fn mock_vllm_stats(port: u16) -> reqwest::Result<serde_json::Value> {
    reqwest::get(format!("http://127.0.0.1:{port}/mock/stats"))
        .await?
        .json()
        .await
}

/// A loopback TCP port held for a server for as long as this lives: a socket bound to it
/// that never listens. It is bound without `SO_REUSEADDR` (so it fails where anyone else holds
/// the port) and then takes the option (and `SO_REUSEPORT`): the system hands the port to no
/// one else (neither `bind` to port 0 nor an outgoing connection takes a port a socket is
/// bound to), while a server that binds it with `SO_REUSEADDR` — Tokio's listeners, Python's
/// and vLLM's servers, llama.cpp's — may listen on it, again after a restart. Until one
/// listens, connections to it are refused: it is also an address where nothing answers.
#[derive(Debug)]
pub struct ReservedPort {
    _socket: socket2::Socket,
    addr: std::net::SocketAddr,
}

impl ReservedPort {
    /// A port on `127.0.0.1`.
    pub fn new() -> std::io::Result<Self> {
        Self::on(std::net::Ipv4Addr::LOCALHOST)
    }

    /// A port on the loopback address `ip` (a harness node's own, for instance).
    pub fn on(ip: std::net::Ipv4Addr) -> std::io::Result<Self> {
        Self::at((ip, 0).into())
    }

    /// `count` consecutive ports on `127.0.0.1` (replicas of a `[[vllm]]` group take the ports
    /// from its `port` on).
    pub fn consecutive(count: u16) -> std::io::Result<Vec<Self>> {
        loop {
            let first = Self::new()?;
            let base = first.port();
            let rest: std::io::Result<Vec<Self>> = (1..count)
                .map(|i| match base.checked_add(i) {
                    Some(port) => Self::at((std::net::Ipv4Addr::LOCALHOST, port).into()),
                    None => Err(std::io::ErrorKind::AddrNotAvailable.into()),
                })
                .collect();
            if let Ok(rest) = rest {
                return Ok(std::iter::once(first).chain(rest).collect());
            }
        }
    }

    fn at(addr: std::net::SocketAddr) -> std::io::Result<Self> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&addr.into())?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        let addr = socket.local_addr()?.as_socket().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an IP address")
        })?;
        Ok(Self {
            _socket: socket,
            addr,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// `http://ADDR/v1`: an upstream URL where nothing answers (connections are refused).
    pub fn dead_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// A provider section for an OpenAI-compatible upstream at `base_url` serving `models`.
pub fn provider_toml(id: &str, base_url: &str, models: &[&str], extra: &str) -> String {
    provider_toml_kind(id, "openai", base_url, models, extra)
}

/// A `[[providers]]` section of the given kind (`openai`, `vllm`, `anthropic`).
pub fn provider_toml_kind(
    id: &str,
    kind: &str,
    base_url: &str,
    models: &[&str],
    extra: &str,
) -> String {
    let models: Vec<String> = models.iter().map(|m| format!("{m:?}")).collect();
    format!(
        "[[providers]]\nid = \"{id}\"\nkind = \"{kind}\"\nbase_url = \"{base_url}\"\nmodels = [{}]\n{extra}\n",
        models.join(", ")
    )
}

/// Seconds since the Unix epoch, now.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs `python` with `args` (a script and its arguments, or `-c CODE …`) and reads the JSON
/// it prints; the error carries what Python wrote to stderr when it exits with an error.
pub async fn python_json(
    python: &std::path::Path,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let out = tokio::process::Command::new(python)
        .args(args)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "the SDK raised:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A clock for an in-process node on which the next `needed` (at most 50 s) fall inside one
/// minute: the system's, or, when less of its minute is left, the system's moved ahead to the
/// start of the next minute. A test that checks per-minute limits must not straddle a window
/// boundary (the next window brings a fresh budget and the limit is not reached when the test
/// expects it), and this way it does not wait for one either.
pub fn clock_inside_one_minute(needed: Duration) -> WallClock {
    clock_inside_one(60_000, needed.min(Duration::from_secs(50)))
}

/// The same for one UTC day: a test of daily limits must not straddle midnight (the next day
/// brings a fresh budget).
pub fn clock_inside_one_day(needed: Duration) -> WallClock {
    clock_inside_one(86_400_000, needed)
}

/// The system's clock, moved ahead to the start of the next period of `period_ms` if less
/// than `needed` of the current one is left.
fn clock_inside_one(period_ms: u64, needed: Duration) -> WallClock {
    let now = meridian_policy::clock::unix_ms();
    let skew = next_period_if_short(now, period_ms, needed).map_or(0, |next| next + 100 - now);
    WallClock::ahead_by(std::sync::Arc::new(std::sync::atomic::AtomicI64::new(
        skew as i64,
    )))
}

/// The start of the next period of `period_ms` (Unix ms) if less than `needed` of the one
/// `now` is in is left.
pub fn next_period_if_short(now: u64, period_ms: u64, needed: Duration) -> Option<u64> {
    let next = (now / period_ms + 1) * period_ms;
    (next - now < needed.as_millis() as u64).then_some(next)
}

/// Polls `cond` until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Splits a whole SSE body into events (comments dropped).
pub fn sse_events(body: &[u8]) -> Vec<SseEvent> {
    let mut p = SseParser::new();
    p.push(body);
    let mut out = Vec::new();
    while let Ok(Some(ev)) = p.next_event() {
        out.push(ev);
    }
    out
}

/// The chunks of an SSE body as JSON, and whether it ended with `[DONE]` (sent at most once).
pub fn sse_chunks(body: &[u8]) -> (Vec<serde_json::Value>, bool) {
    let events = sse_events(body);
    let done = events.last().is_some_and(|e| &e.data[..] == b"[DONE]");
    let done_count = events.iter().filter(|e| &e.data[..] == b"[DONE]").count();
    assert!(done_count <= 1, "at most one [DONE]");
    let chunks = events
        .iter()
        .filter(|e| &e.data[..] != b"[DONE]")
        .map(|e| {
            serde_json::from_slice(&e.data)
                .unwrap_or_else(|err| panic!("every data line is JSON: {err}"))
        })
        .collect();
    (chunks, done)
}

/// A chat request body with one user message.
pub fn chat_body(model: &str, stream: bool, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(",{extra}")
    };
    format!(
        r#"{{"model":{model:?},"stream":{stream},"messages":[{{"role":"user","content":"say something"}}]{extra}}}"#
    )
}

/// Runs `install` once across every test process (nextest runs each test in a process of its
/// own, and several may need the same virtualenv or download at once): `ready` is asked only
/// while holding the lock folder `lock` (a half-done install can look ready from outside), and
/// `install` runs under it when `ready` does not hold. A lock left by a process that died is
/// taken over after 15 minutes.
pub fn install_once(
    lock: &std::path::Path,
    ready: impl Fn() -> bool,
    install: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        if let Some(parent) = lock.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::create_dir(lock) {
            Ok(()) => {
                let done = if ready() { Ok(()) } else { install() };
                let _ = std::fs::remove_dir(lock);
                return done;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if started.elapsed() > Duration::from_secs(15 * 60) {
                    let _ = std::fs::remove_dir(lock);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e.into()),
        }
    }
}
