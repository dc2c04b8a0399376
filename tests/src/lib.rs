//! Meridian's test support: the mock upstream, an in-process node harness, the multi-process
//! cluster harness ([`procs`]), and helpers.
//! The integration tests live in `tests/tests/`; the load benchmark in `src/bin/bench-gateway.rs`.

pub mod mock;
pub mod procs;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use meridian_actors::Gateway;
use meridian_actors::upstream::sse::{SseEvent, SseParser};
use meridian_node::config;
use meridian_node::{App, AppError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A node running in this process on loopback ports picked by the OS.
pub struct TestNode {
    pub http: SocketAddr,
    /// The node's data directory (Raft log and snapshots), removed with the node.
    pub data: Option<tempfile::TempDir>,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub gateway: Gateway,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), AppError>>>,
}

impl TestNode {
    /// Starts a node from TOML text; its listeners are moved to port 0 through the
    /// `MERIDIAN_…` overrides, the way an operator would.
    pub async fn start(toml: &str) -> anyhow::Result<Self> {
        Self::start_with_env(toml, Vec::new()).await
    }

    pub async fn start_with_env(
        toml: &str,
        mut env: Vec<(String, String)>,
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
        let config = config::load(Some(toml), &env)?;
        let mut node = Self::start_config(config).await?;
        node.data = Some(data);
        Ok(node)
    }

    pub async fn start_config(config: meridian_node::Config) -> anyhow::Result<Self> {
        let app = App::build(config).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (http, grpc, admin) = (app.http_addr(), app.grpc_addr(), app.admin_addr());
        let gateway = app.gateway().clone();
        let task = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            http,
            data: None,
            grpc,
            admin,
            gateway,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
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

/// A provider section for an OpenAI-compatible upstream at `base_url` serving `models`.
pub fn provider_toml(id: &str, base_url: &str, models: &[&str], extra: &str) -> String {
    let models: Vec<String> = models.iter().map(|m| format!("{m:?}")).collect();
    format!(
        "[[providers]]\nid = \"{id}\"\nkind = \"openai\"\nbase_url = \"{base_url}\"\nmodels = [{}]\n{extra}\n",
        models.join(", ")
    )
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
