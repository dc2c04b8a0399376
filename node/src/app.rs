//! [`App`]: a whole node — actors, HTTP edge, gRPC and admin servers — built from a validated
//! [`Config`]. `main` and the integration tests run the same `App`.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meridian_actors::auth;
use meridian_actors::replicated::Replicated;
use meridian_actors::vllm::supervisor::Vllm;
use meridian_actors::{Gateway, GatewayConfig, RestartBudget};
use meridian_cluster::raft::ClusterNode;

use crate::calls::{CallsError, Origin, SqliteCalls};
use meridian_proto::cluster::{ApiKeyRecord, Command, Tenant, Tier};
use meridian_proto::pb;
use prometheus_client::metrics::histogram::Histogram;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::server::TcpIncoming;

use crate::admin::AdminService;
use crate::config::{Config, ConfigError};
use crate::grpc::InferenceService;
use crate::http::{self, HttpState};

/// Most concurrent HTTP/2 streams per connection (a bound against rapid-reset floods).
pub(crate) const H2_MAX_STREAMS: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen for {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the actor system: {0}")]
    Actors(String),
    #[error("cannot start the cluster member: {0}")]
    Cluster(String),
    #[error("the {0} server failed: {1}")]
    Serve(&'static str, String),
    #[error(transparent)]
    Calls(#[from] CallsError),
    #[error(transparent)]
    Export(#[from] crate::otlp::ExportError),
}

pub struct App {
    config: Config,
    /// What the admin API requires as `authorization: Bearer …`.
    admin_token: Arc<str>,
    /// Secrets made at this start, to show once: a new admin token, a development API key.
    first_start: FirstStart,
    gateway: Gateway,
    /// This node's vLLM replicas (none without `[[vllm]]` sections).
    vllm: Vllm,
    cluster: ClusterNode,
    /// The per-call log (`None` with `[calls] enabled = false`).
    calls: Option<Arc<SqliteCalls>>,
    /// This node's proposals' time to commit (its own; `/metrics`).
    commit_latency: Histogram,
    /// The trace exporter (`None`: traces off).
    traces: Option<crate::traces::Traces>,
    /// The call records' OTLP exporter (`None`: not configured).
    calls_otlp: Option<Arc<crate::otlp::OtlpCalls>>,
    /// The QUIC endpoint, the actor mesh, and the tasks that serve them (multi-node only).
    peering: Option<crate::peering::Peering>,
    /// The spend alert task (it acts while this node leads), and what it did.
    alerts: (tokio::task::JoinHandle<()>, Arc<crate::alerts::AlertCounts>),
    http: TcpListener,
    grpc: TcpListener,
    admin: TcpListener,
    started: Instant,
    /// This run's start, as the node records it in the member table (see [`Member`]).
    started_unix_ms: u64,
    /// Reloads the configuration file on SIGHUP and through the admin API (`None`: the node
    /// runs the embedded default, or was built from a config in code).
    reloader: Option<crate::reload::Reloader>,
    /// The lookups of providers found by DNS (`discover = true`).
    discovery: Vec<tokio::task::JoinHandle<()>>,
}

impl App {
    /// Starts the actors and binds every listener (port 0 picks a free port; see the `*_addr`
    /// accessors). Nothing is served until [`App::run`].
    pub async fn build(config: Config) -> Result<Self, AppError> {
        // Providers found by DNS join once the gateway runs (see `crate::discover`).
        let specs = config
            .providers
            .iter()
            .filter(|p| p.discover.is_none())
            .map(|p| p.to_spec())
            .collect::<Result<Vec<_>, _>>()?;
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| AppError::Bind { what, addr, source })
        };
        let http = bind("HTTP", config.http.listen).await?;
        let grpc = bind("gRPC", config.grpc_listen).await?;
        let admin = bind("admin gRPC", config.admin_listen).await?;
        let started_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let (cluster, quic) =
            crate::peering::start_cluster(&config, http.local_addr().ok(), started_unix_ms).await?;
        let commit_latency = crate::metrics::commit_histogram();
        let traces = match &config.traces {
            Some(target) => Some(crate::traces::Traces::start(
                target,
                config.node.id,
                &config.node.region,
            )?),
            None => None,
        };
        let calls_otlp = match &config.calls_otlp {
            Some(target) => Some(Arc::new(crate::otlp::OtlpCalls::start(
                target,
                config.node.id,
                &config.node.region,
            )?)),
            None => None,
        };
        let calls = match config.calls_retention {
            Some(retention) => Some(Arc::new(SqliteCalls::open(
                &config.node.data_dir,
                Origin {
                    node: config.node.id,
                    region: config.node.region.clone(),
                },
                retention,
            )?)),
            None => None,
        };
        let gateway = Gateway::start(GatewayConfig {
            providers: specs,
            limits: config.limits,
            restart_budget: RestartBudget::default(),
            auth: config.auth.enabled,
            quota: Some(config.quota.clone()),
            jwt: config.jwt.clone(),
            prices: config.prices.clone(),
            cache: config.cache,
            breaker: config.breaker.clone(),
            clock: config.quota.clock.clone(),
            label_caps: config.label_caps,
            traces: traces.is_some(),
            call_log: {
                use meridian_actors::calllog::CallLog;
                let sinks: Vec<Arc<dyn CallLog>> = [
                    calls.as_ref().map(|c| Arc::clone(c) as Arc<dyn CallLog>),
                    calls_otlp
                        .as_ref()
                        .map(|c| Arc::clone(c) as Arc<dyn CallLog>),
                ]
                .into_iter()
                .flatten()
                .collect();
                match sinks.len() {
                    0 => None,
                    1 => sinks.into_iter().next(),
                    _ => Some(Arc::new(crate::otlp::CallSinks(sinks)) as Arc<dyn CallLog>),
                }
            },
            region: config.node.region.clone(),
            aliases: config.aliases.clone(),
            awaited_models: config
                .vllm
                .iter()
                .flat_map(|g| g.models().into_iter().map(|m| m.name))
                .collect(),
            cluster: Some(Replicated {
                node_id: config.node.id,
                state: cluster.state(),
                proposer: Arc::new(crate::peering::RaftProposer {
                    cluster: cluster.clone(),
                    took: commit_latency.clone(),
                }),
            }),
        })
        .await
        .map_err(|e| AppError::Actors(e.to_string()))?;
        let mut discovery = Vec::new();
        for p in config.providers.iter().filter(|p| p.discover.is_some()) {
            let every = p.discover.unwrap_or(Duration::from_secs(10));
            discovery.push(
                crate::discover::start(
                    p.clone(),
                    every,
                    gateway.clone(),
                    Arc::new(crate::discover::Dns),
                )
                .await,
            );
        }
        let vllm = Vllm::start(
            config.vllm.clone(),
            gateway.registry().clone(),
            config.node.id,
            &config.nvidia_smi,
        )
        .await
        .map_err(|e| AppError::Actors(e.to_string()))?;
        let peering = match (quic, &config.cluster) {
            (Some((transport, mut tasks)), Some(peers)) => {
                let mesh = Arc::new(crate::peering::start_mesh(&config, peers, &gateway).await?);
                tasks.push(tokio::spawn(crate::peering::keep_mesh_connected(
                    Arc::clone(&mesh),
                    cluster.clone(),
                    config.node.id,
                )));
                Some(crate::peering::Peering {
                    transport,
                    mesh,
                    tasks,
                })
            }
            _ => None,
        };
        let alert_counts = Arc::new(crate::alerts::AlertCounts::default());
        let alerts = crate::alerts::start(
            cluster.clone(),
            config.node.id,
            config.alerts.clone(),
            Arc::clone(&alert_counts),
        );
        let (admin_token, new_admin_token) = admin_token(&config)?;
        let dev_key = if config.auth.enabled && config.auth.dev_key && config.cluster.is_none() {
            bootstrap_dev_key(&cluster).await?
        } else {
            None
        };
        Ok(Self {
            config,
            admin_token: admin_token.into(),
            first_start: FirstStart {
                admin_token: new_admin_token,
                dev_key,
            },
            gateway,
            vllm,
            cluster,
            calls,
            commit_latency,
            traces,
            calls_otlp,
            peering,
            alerts: (alerts, alert_counts),
            http,
            grpc,
            admin,
            started: Instant::now(),
            started_unix_ms,
            reloader: None,
            discovery,
        })
    }

    /// The configuration came from `path`: SIGHUP and the admin API's `ReloadConfig` read it
    /// again (see [`crate::reload`]).
    pub fn reload_from(&mut self, path: std::path::PathBuf) {
        self.reloader = Some(crate::reload::Reloader::new(
            Some(path),
            self.gateway.clone(),
            self.config.clone(),
        ));
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().unwrap_or(self.config.http.listen)
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().unwrap_or(self.config.grpc_listen)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin_listen)
    }

    /// Secrets made at this start, to show the operator once.
    pub fn first_start(&self) -> &FirstStart {
        &self.first_start
    }

    /// The token the admin API requires.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    pub fn vllm(&self) -> &Vllm {
        &self.vllm
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.config.node.data_dir
    }

    pub fn cluster(&self) -> &ClusterNode {
        &self.cluster
    }

    /// Serves until `shutdown` resolves, then drains: new requests are refused (503, `/readyz`
    /// turns 503), listeners close, in-flight requests finish up to the drain timeout, and the
    /// actors stop.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AppError> {
        let started_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
            .unwrap_or(0);
        let (http_addr, grpc_addr) = (self.http_addr(), self.grpc_addr());
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connections = crate::conns::ConnLimits::new(
            self.config.http.max_connections,
            self.config.http.max_connections_per_client,
        );
        // Ready once this run has caught up with the cluster: it has applied its own record in
        // the member table (proposed at start), and with it everything committed before.
        // The gRPC health service says the same as `/readyz`.
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_not_serving::<pb::v1::inference_server::InferenceServer<InferenceService>>()
            .await;
        let caught_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (me, run) = (self.config.node.id, self.started_unix_ms);
        let this_run = move |s: &Arc<meridian_proto::cluster::ClusterState>| {
            s.members.get(&me).is_some_and(|m| m.started_unix_ms == run)
        };
        let catching_up = tokio::spawn({
            let (mut state, caught_up) = (self.cluster.state(), Arc::clone(&caught_up));
            let health = health.clone();
            async move {
                let _ = state.wait_for(this_run).await;
                caught_up.store(true, std::sync::atomic::Ordering::Relaxed);
                health
                    .set_serving::<pb::v1::inference_server::InferenceServer<InferenceService>>()
                    .await;
                tracing::info!("caught up with the cluster: ready");
            }
        });
        // A single node (or one whose record applied already) is ready before it serves.
        if this_run(&self.cluster.state().borrow()) {
            caught_up.store(true, std::sync::atomic::Ordering::Relaxed);
            health
                .set_serving::<pb::v1::inference_server::InferenceServer<InferenceService>>()
                .await;
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        // SIGHUP reloads the configuration file; the task ends with the process.
        if let Some(reloader) = self.reloader.clone() {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(mut hangups) => {
                    tokio::spawn(async move {
                        while hangups.recv().await.is_some() {
                            match reloader.reload().await {
                                Ok(r) => tracing::info!(%r, "configuration reloaded (SIGHUP)"),
                                Err(e) => {
                                    tracing::error!(error = %e, "configuration not reloaded (SIGHUP)")
                                }
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; reload through the admin API")
                }
            }
        }
        let reflection = |set| {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(set)
                .build_v1()
                .map_err(|e| AppError::Serve("gRPC", e.to_string()))
        };
        let inference = pb::v1::inference_server::InferenceServer::new(InferenceService {
            gateway: self.gateway.clone(),
            started_unix,
        });
        let grpc = tonic::transport::Server::builder()
            .max_concurrent_streams(H2_MAX_STREAMS)
            .add_service(health_service)
            .add_service(reflection(pb::INFERENCE_DESCRIPTOR_SET)?)
            .add_service(inference)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(self.grpc).with_nodelay(Some(true)),
                stopped(stop_rx.clone()),
            );
        let mut admin = tonic::transport::Server::builder();
        if let Some(tls) = &self.config.admin_tls {
            let identity = tonic::transport::Identity::from_pem(
                &tls.cert_pem,
                tls.key_pem.expose().as_bytes(),
            );
            admin = admin
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map_err(|e| AppError::Serve("admin", format!("TLS: {e}")))?;
        }
        let admin = admin
            .add_service(reflection(pb::ADMIN_DESCRIPTOR_SET)?)
            .add_service(pb::admin::admin_server::AdminServer::with_interceptor(
                AdminService {
                    gateway: self.gateway.clone(),
                    vllm: self.vllm.clone(),
                    cluster: self.cluster.clone(),
                    node_id: self.config.node.id,
                    region: self.config.node.region.clone(),
                    started: self.started,
                    http_addr: http_addr.to_string(),
                    grpc_addr: grpc_addr.to_string(),
                    mesh: self.peering.as_ref().map(|p| Arc::clone(&p.mesh)),
                    calls: self
                        .calls
                        .as_ref()
                        .map(|_| self.config.node.data_dir.join(crate::calls::FILE)),
                    reloader: self.reloader.clone(),
                },
                admin_auth(Arc::clone(&self.admin_token)),
            ))
            .serve_with_incoming_shutdown(
                TcpIncoming::from(self.admin).with_nodelay(Some(true)),
                stopped(stop_rx.clone()),
            );
        let router = http::router(HttpState {
            gateway: self.gateway.clone(),
            vllm: self.vllm.clone(),
            cluster: self.cluster.clone(),
            metrics: crate::metrics::NodeMetrics::new(
                crate::metrics::NodeMetrics::node_parts(self.commit_latency.clone(), &connections),
                self.gateway.clone(),
                self.cluster.clone(),
                self.vllm.clone(),
                self.calls.clone(),
                crate::metrics::Exports {
                    spans: self.traces.as_ref().map(|t| Arc::clone(t.counts())),
                    call_records: self.calls_otlp.as_ref().map(|c| Arc::clone(c.counts())),
                },
                Arc::clone(&self.alerts.1),
            ),
            sse_heartbeat: self.config.http.sse_heartbeat,
            started_unix,
            stopping: Arc::clone(&stopping),
            caught_up: Arc::clone(&caught_up),
            body: crate::http::BodyBounds {
                max_bytes: self.config.http.max_body_bytes,
                timeout: self.config.http.body_timeout,
                min_rate: self.config.http.min_body_rate,
            },
        });
        let http = crate::listener::serve_http(
            self.http,
            router,
            self.config.http.header_read_timeout,
            connections,
            stopped(stop_rx),
        );

        let mut servers = JoinSet::new();
        servers.spawn(async move {
            grpc.await
                .map_err(|e| AppError::Serve("gRPC", e.to_string()))
        });
        servers.spawn(async move {
            admin
                .await
                .map_err(|e| AppError::Serve("admin", e.to_string()))
        });
        servers.spawn(async move {
            http.await;
            Ok(())
        });

        tokio::pin!(shutdown);
        let failure = tokio::select! {
            () = &mut shutdown => None,
            Some(done) = servers.join_next() => Some(done),
        };
        // Out of rotation first: readiness fails (HTTP `/readyz`, gRPC health) while requests
        // are still served for the unready period, so that balancers stop sending here before
        // the drain refuses anything. A server that failed skips the wait.
        stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        catching_up.abort();
        health
            .set_not_serving::<pb::v1::inference_server::InferenceServer<InferenceService>>()
            .await;
        let unready = self.config.unready_period;
        if failure.is_none() && !unready.is_zero() {
            tracing::info!(unready_period = ?unready, "stopping: not ready, still serving");
            tokio::time::sleep(unready).await;
        }
        tracing::info!(drain_timeout = ?self.config.drain_timeout, "shutting down: draining in-flight requests");
        self.gateway.begin_drain();
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(self.config.drain_timeout, async {
            while servers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            // Streams still open end with an error event that says why; what is left after a
            // moment to send those is dropped.
            tracing::warn!("drain timeout reached; cutting the remaining streams and connections");
            self.gateway.cut_streams();
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while servers.join_next().await.is_some() {}
            })
            .await;
            servers.shutdown().await;
        }
        // Replicas: deregistered, their in-flight calls (if any are left) finish up to each
        // group's drain timeout, then SIGTERM, then SIGKILL.
        for lookup in &self.discovery {
            lookup.abort();
        }
        self.vllm.shutdown().await;
        self.alerts.0.abort();
        self.gateway.stop(Duration::from_secs(5)).await;
        if let Some(calls) = &self.calls {
            // Every request has ended: what they recorded is written before the node exits.
            let calls = Arc::clone(calls);
            let _ = tokio::task::spawn_blocking(move || calls.close(Duration::from_secs(5))).await;
        }
        self.cluster.shutdown().await;
        if let Some(traces) = &self.traces {
            traces.shutdown();
        }
        if let Some(calls) = &self.calls_otlp {
            calls.shutdown();
        }
        if let Some(p) = self.peering {
            p.mesh.stop();
            p.transport.close();
            for t in p.tasks {
                t.abort();
            }
        }
        match failure {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(join)) => Err(AppError::Serve("node", join.to_string())),
            _ => Ok(()),
        }
    }
}

/// Secrets made at this start (`None` when they already existed).
#[derive(Debug, Default)]
pub struct FirstStart {
    /// A new admin token (also saved in `<data_dir>/admin.token`).
    pub admin_token: Option<String>,
    /// A development API key for tenant `dev` (never stored; shown once).
    pub dev_key: Option<String>,
}

/// The admin token: `admin.token_env` if set, else `<data_dir>/admin.token`, made (readable by
/// this user only) on first start. Returns the token and, if it was just made, a copy to show.
fn admin_token(config: &Config) -> Result<(String, Option<String>), AppError> {
    if let Some(t) = &config.admin_token {
        return Ok((t.expose().to_owned(), None));
    }
    let path = config.node.data_dir.join("admin.token");
    let failed = |e: &dyn std::fmt::Display| AppError::Cluster(format!("{}: {e}", path.display()));
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_owned(), None)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(&e)),
    }
    let token = auth::random_token(32).map_err(|e| failed(&format!("no OS randomness: {e}")))?;
    save_secret(&config.node.data_dir, "admin.token", &token).map_err(|e| failed(&e))?;
    Ok((token.clone(), Some(token)))
}

/// Writes `secret` to `<dir>/<name>`, readable by this user only (made, or replaced, with mode
/// 0600), and returns the path.
pub fn save_secret(
    dir: &std::path::Path,
    name: &str,
    secret: &str,
) -> std::io::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    // An older file keeps its mode through `open`: set it again.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(format!("{secret}\n").as_bytes())?;
    file.sync_all()?;
    Ok(path)
}

/// The admin API's gate: `authorization: Bearer <admin token>`, compared in constant time.
fn admin_auth(
    token: Arc<str>,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req: tonic::Request<()>| {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| auth::bearer(Some(v), None));
        match presented {
            None => Err(tonic::Status::unauthenticated(
                "the admin API needs `authorization: Bearer <admin token>` (see admin.token_env or <data_dir>/admin.token)",
            )),
            Some(t) if auth::constant_time_eq(t.as_bytes(), token.as_bytes()) => Ok(req),
            Some(_) => Err(tonic::Status::unauthenticated("the admin token is wrong")),
        }
    }
}

/// On a fresh single-node cluster with no API keys: tier and tenant `dev` (no limits) and a key
/// for it, returned to be shown once.
async fn bootstrap_dev_key(cluster: &ClusterNode) -> Result<Option<String>, AppError> {
    if !cluster.state().borrow().api_keys.is_empty() {
        return Ok(None);
    }
    let failed = |e: &dyn std::fmt::Display| AppError::Cluster(format!("development key: {e}"));
    let key = auth::generate_key().map_err(|e| failed(&format!("no OS randomness: {e}")))?;
    let commands = vec![
        Command::UpsertTier(Tier {
            name: "dev".into(),
            ..Tier::default()
        }),
        Command::UpsertTenant(Tenant {
            id: "dev".into(),
            tier: "dev".into(),
            ..Tenant::default()
        }),
        Command::CreateApiKey(ApiKeyRecord {
            id: key.id.clone(),
            tenant: "dev".into(),
            sha256_hex: key.sha256_hex.clone(),
            label: "development key made on first start".into(),
            created_at_unix_ms: 0,
            revoked_at_unix_ms: None,
        }),
    ];
    cluster
        .propose(Command::Batch { commands })
        .await
        .map_err(|e| failed(&e))?;
    Ok(Some(key.secret))
}
