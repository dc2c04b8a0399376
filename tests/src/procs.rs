//! The multi-process harness: real `meridian` processes, each on its own loopback address
//! (`127.0.S.ID`, one subnet `S` per test so tests can run side by side), with its own data
//! directory and log file, talking Raft over QUIC with certificates from a CA made for the test.
//!
//! Nodes can be killed (`kill -9`), frozen and thawed (SIGSTOP/SIGCONT) and restarted on the
//! same data. Every wait polls a condition against a deadline; nothing sleeps a fixed time and
//! hopes. When a test panics, the tail of every node's log is printed.
//!
//! No port is fixed or picked by binding and letting go: the system picks every port, and the
//! harness holds each for the node's whole life (`NodeSockets`).
//!
//! The binary is the workspace's `target/<profile>/meridian`, which `cargo nextest run
//! --workspace` (or `cargo test --workspace`) builds with the node's own tests; set
//! `MERIDIAN_BIN` to use another one (one that takes its Raft socket from `LISTEN_FDS`: the
//! harness holds that port itself). The tests that move a cluster's clock need a binary built
//! with the node's `test-clock` feature, as the workspace's builds are; one built by
//! `cargo build -p meridian-node` alone refuses their skew file at start.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_policy::clock::WallClock;
use meridian_proto::pb::admin::admin_client::AdminClient;
use meridian_proto::pb::admin::{
    self as pb, ClusterStatusRequest, ClusterStatusResponse, ListTenantsRequest,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use command_fds::{CommandFdExt, FdMapping};

use crate::{Bearer, ReservedPort};

/// The admin token every node of a harness accepts (through `admin.token_env`).
const ADMIN_TOKEN: &str = "harness-admin-token-0123456789abcdef";
const ADMIN_TOKEN_ENV: &str = "MERIDIAN_TEST_ADMIN_TOKEN";

/// Raft timings for the processes: fast, but with room for a loaded 2-core CI machine.
const TIMINGS: &str = "heartbeat = \"50ms\"\nelection_timeout_min = \"300ms\"\nelection_timeout_max = \"600ms\"\nsnapshot_every = 500\nkeep_after_snapshot = 100\n";

/// The `meridian` binary under test.
pub fn meridian_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MERIDIAN_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test binary> → target/<profile>/meridian
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test binary location {}", exe.display()));
    let bin = profile_dir.join("meridian");
    assert!(
        bin.exists(),
        "{} does not exist: build it with `cargo build -p meridian-node --features test-clock` \
         (the workspace test command does) or set MERIDIAN_BIN",
        bin.display()
    );
    bin
}

/// A node's client-facing ports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ports {
    pub http: u16,
    pub grpc: u16,
    pub admin: u16,
}

/// A node's sockets. The system picks every port when the node is first configured (its
/// peers must know its Raft port before it starts), and the harness holds them all for its
/// whole life, so nothing else can take one while the node is down: the Raft (QUIC) socket
/// itself is handed to each start of the node (`LISTEN_FDS`); the TCP ports are held by
/// [`ReservedPort`]s the node's listeners bind beside.
struct NodeSockets {
    raft: std::net::UdpSocket,
    mesh: ReservedPort,
    http: ReservedPort,
    grpc: ReservedPort,
    admin: ReservedPort,
}

impl NodeSockets {
    fn on(ip: &str) -> Self {
        let ip: std::net::Ipv4Addr = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
        let tcp = || ReservedPort::on(ip).unwrap_or_else(|e| panic!("{ip}: {e}"));
        Self {
            raft: std::net::UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("{ip}: {e}")),
            mesh: tcp(),
            http: tcp(),
            grpc: tcp(),
            admin: tcp(),
        }
    }

    fn raft_port(&self) -> u16 {
        self.raft
            .local_addr()
            .unwrap_or_else(|e| panic!("raft socket: {e}"))
            .port()
    }

    fn ports(&self) -> Ports {
        Ports {
            http: self.http.port(),
            grpc: self.grpc.port(),
            admin: self.admin.port(),
        }
    }
}

/// One node of a [`Harness`].
pub struct Proc {
    pub id: u64,
    pub ip: String,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Its client-facing ports (see [`Ports`]).
    pub ports: Ports,
    /// Its Raft (QUIC) and actor-mesh ports.
    pub raft_port: u16,
    pub mesh_port: u16,
    child: Option<Child>,
    frozen: bool,
}

impl Proc {
    pub fn raft_addr(&self) -> String {
        format!("{}:{}", self.ip, self.raft_port)
    }

    /// Its actor-mesh listener's address.
    pub fn mesh_addr(&self) -> std::net::SocketAddr {
        format!("{}:{}", self.ip, self.mesh_port)
            .parse()
            .unwrap_or_else(|e| panic!("mesh address: {e}"))
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.http_addr())
    }

    pub fn admin(&self) -> String {
        format!("http://{}:{}", self.ip, self.ports.admin)
    }

    pub fn grpc(&self) -> String {
        format!("http://{}:{}", self.ip, self.ports.grpc)
    }

    /// Its HTTP listener's address, `IP:PORT`.
    pub fn http_addr(&self) -> String {
        format!("{}:{}", self.ip, self.ports.http)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its resident memory now (`VmRSS`, KiB), while it runs.
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = i32::try_from(self.pid()?).ok()?;
        procfs::process::Process::new(pid)
            .ok()?
            .status()
            .ok()?
            .vmrss
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn signal(&self, sig: &str) {
        let Some(child) = &self.child else {
            panic!("node {} is not running", self.id)
        };
        let ok = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} node {}", self.id);
    }
}

/// A cluster of `meridian` processes.
pub struct Harness {
    /// The `[[providers]]` every node gets (default: the built-in demo model).
    pub providers: String,
    /// More configuration for one node (appended to its file), by node id.
    pub extra: BTreeMap<u64, String>,
    /// More `[http]` fields for every node (`key = value` lines).
    pub http_extra: String,
    tmp: tempfile::TempDir,
    pki: PathBuf,
    subnet: u8,
    bin: PathBuf,
    pub nodes: BTreeMap<u64, Proc>,
    sockets: BTreeMap<u64, NodeSockets>,
    /// How far ahead of the system's clock the nodes run, once [`Harness::test_clock`] asked.
    skew: Option<Arc<AtomicI64>>,
}

impl Harness {
    /// A harness on `127.0.{subnet}.0/24`; give each test its own subnet.
    pub fn new(subnet: u8) -> Self {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let pki = tmp.path().join("pki");
        meridian_cluster::certs::init_ca(&pki, &meridian_cluster::certs::ca_key_beside(&pki))
            .unwrap_or_else(|e| panic!("certs init: {e}"));
        Self {
            providers: "[[providers]]\nid = \"demo\"\nkind = \"demo\"\nmodels = [\"demo\"]\n"
                .into(),
            extra: BTreeMap::new(),
            http_extra: String::new(),
            tmp,
            pki,
            subnet,
            bin: meridian_bin(),
            nodes: BTreeMap::new(),
            sockets: BTreeMap::new(),
            skew: None,
        }
    }

    /// Runs every node on a clock this harness moves forward ([`Harness::skip_clock_to`])
    /// instead of the system's, and returns it: the test reads the nodes' time through it (a
    /// mock counts its minutes on it). Asked before any node starts.
    pub fn test_clock(&mut self) -> WallClock {
        assert!(
            self.running().is_empty(),
            "test_clock before the nodes start: a running node would keep the system's clock"
        );
        let file = self.skew_file();
        let skew = self.skew.get_or_insert_with(|| {
            std::fs::write(&file, "0").unwrap_or_else(|e| panic!("the clock's skew file: {e}"));
            Arc::new(AtomicI64::new(0))
        });
        WallClock::ahead_by(Arc::clone(skew))
    }

    fn skew_file(&self) -> PathBuf {
        self.tmp.path().join("clock-skew-ms")
    }

    /// Moves the nodes' clock forward to `unix_ms` (not at all if it is there already), and
    /// gives every node time to read it: each reads the skew file every 5 ms, so for a few
    /// milliseconds the nodes differ by the step, as nodes' clocks may.
    pub async fn skip_clock_to(&self, unix_ms: u64) {
        let skew = self
            .skew
            .as_ref()
            .unwrap_or_else(|| panic!("skip_clock_to needs test_clock before the nodes start"));
        let by = i64::try_from(unix_ms.saturating_sub(self.test_clock_now())).unwrap_or(0);
        if by == 0 {
            return;
        }
        let to = skew.fetch_add(by, SeqCst) + by;
        // Replaced whole, so that a node never reads half a number.
        let (file, next) = (self.skew_file(), self.tmp.path().join("clock-skew-ms.next"));
        std::fs::write(&next, to.to_string()).unwrap_or_else(|e| panic!("skew file: {e}"));
        std::fs::rename(&next, &file).unwrap_or_else(|e| panic!("skew file: {e}"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Makes sure the nodes' current minute has `needed` left to run: if it has not, skips
    /// their clock to the start of the next one (instead of waiting for it).
    pub async fn inside_one_minute(&self, needed: Duration) {
        self.inside_one(60_000, needed).await;
    }

    /// Makes sure the nodes' current day (UTC) has `needed` left to run, the same way: a test
    /// of daily limits must not straddle midnight (the next day starts from nothing).
    pub async fn inside_one_day(&self, needed: Duration) {
        self.inside_one(86_400_000, needed).await;
    }

    async fn inside_one(&self, period_ms: u64, needed: Duration) {
        if let Some(next) = crate::next_period_if_short(self.test_clock_now(), period_ms, needed) {
            self.skip_clock_to(next).await;
        }
    }

    /// The ledger's entry for limit key `key` (e.g. `tenant/acme/tokens_per_minute`) as node
    /// `id` holds it, in the admin API's JSON; `None` if the node does not answer or holds none.
    pub async fn ledger_entry(&self, id: u64, key: &str) -> Option<serde_json::Value> {
        let mut a = self.admin(id).await?;
        let r = a
            .cluster_state(pb::ClusterStateRequest {
                section: "ledger".into(),
                prefix: key.into(),
                ..Default::default()
            })
            .await
            .ok()?;
        let mut v: serde_json::Value = serde_json::from_str(&r.into_inner().json).ok()?;
        Some(v.get_mut(key)?.take())
    }

    /// Now on the nodes' clock, in Unix ms.
    pub fn test_clock_now(&self) -> u64 {
        let skew = self.skew.as_ref().map_or(0, |s| s.load(SeqCst));
        meridian_policy::clock::unix_ms().saturating_add_signed(skew)
    }

    /// A PKI directory for node `id` that trusts this cluster's CA but holds a certificate
    /// from another CA: a client that accepts the cluster's servers, so that only a server's
    /// check of the client's certificate can refuse it.
    pub fn impostor_pki(&self, id: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        meridian_cluster::certs::init_ca(dir.path(), &dir.path().join("issuer/ca.key"))
            .unwrap_or_else(|e| panic!("certs: {e}"));
        meridian_cluster::certs::issue(dir.path(), &dir.path().join("issuer/ca.key"), id, &[])
            .unwrap_or_else(|e| panic!("certs: {e}"));
        std::fs::copy(self.pki.join("ca.crt"), dir.path().join("ca.crt"))
            .unwrap_or_else(|e| panic!("copy the CA: {e}"));
        dir
    }

    /// The mesh cookie the nodes use when none is configured (derived from the CA).
    pub fn mesh_cookie(&self) -> String {
        let ca = std::fs::read(self.pki.join("ca.crt")).unwrap_or_else(|e| panic!("CA: {e}"));
        meridian_actors::auth::sha256_hex(&ca)
    }

    /// Boots `voters` as a new cluster (each lists the others as peers) and waits until they
    /// agree on a leader and every one is in the member table.
    pub async fn boot(&mut self, voters: &[u64]) -> u64 {
        for &id in voters {
            self.configure(id, voters, false);
        }
        for &id in voters {
            self.start(id).await;
        }
        self.agreed_leader(voters, None, Duration::from_secs(30))
            .await
    }

    /// Writes node `id`'s certificate and config: `voters` are the initial voters it knows;
    /// with `join` it waits to be added instead of bootstrapping.
    pub fn configure(&mut self, id: u64, voters: &[u64], join: bool) {
        // A node reconfigured for a restart keeps its certificate.
        if !self.pki.join(format!("node-{id}.key")).exists() {
            meridian_cluster::certs::issue(
                &self.pki,
                &meridian_cluster::certs::ca_key_beside(&self.pki),
                id,
                &[],
            )
            .unwrap_or_else(|e| panic!("certs issue {id}: {e}"));
        }
        let ip = self.ip(id);
        let peers: Vec<String> = voters
            .iter()
            .filter(|p| **p != id)
            .map(|&p| format!("\"{p}@{}:{}\"", self.ip(p), self.sockets(p).raft_port()))
            .collect();
        let (ports, raft_port, mesh_port) = {
            let own = self.sockets(id);
            (own.ports(), own.raft_port(), own.mesh.port())
        };
        let data = self.data_dir(id);
        let text = format!(
            "[node]\nid = {id}\nregion = \"r{region}\"\ndata_dir = {data:?}\n\
             [http]\nlisten = \"{ip}:{http}\"\n{http_extra}\n[grpc]\nlisten = \"{ip}:{grpc}\"\n\
             [admin]\nlisten = \"{ip}:{admin}\"\ntoken_env = \"{ADMIN_TOKEN_ENV}\"\n\
             [cluster]\nlisten = \"{ip}:{raft_port}\"\nmesh_listen = \"{ip}:{mesh_port}\"\n\
             certs_dir = {pki:?}\npeers = [{peers}]\njoin = {join}\n{TIMINGS}\
             {providers}\n{extra}",
            providers = self.providers,
            http_extra = self.http_extra,
            extra = self.extra.get(&id).map_or("", String::as_str),
            http = ports.http,
            grpc = ports.grpc,
            admin = ports.admin,
            region = id % 2,
            pki = self.pki,
            peers = peers.join(", "),
        );
        let config = self.tmp.path().join(format!("node-{id}.toml"));
        std::fs::write(&config, text).unwrap_or_else(|e| panic!("write config: {e}"));
        self.nodes.insert(
            id,
            Proc {
                id,
                ip,
                config,
                log: self.tmp.path().join(format!("node-{id}.log")),
                ports,
                raft_port,
                mesh_port,
                child: None,
                frozen: false,
            },
        );
    }

    /// Node `id`'s loopback address.
    fn ip(&self, id: u64) -> String {
        format!("127.0.{}.{id}", self.subnet)
    }

    /// Node `id`'s cluster sockets, made the first time they are asked for.
    fn sockets(&mut self, id: u64) -> &NodeSockets {
        let ip = self.ip(id);
        self.sockets
            .entry(id)
            .or_insert_with(|| NodeSockets::on(&ip))
    }

    /// Node `id`'s data directory.
    /// The cluster's certs directory (its CA key is beside it, [`Self::ca_key`]).
    pub fn pki(&self) -> &Path {
        &self.pki
    }

    pub fn ca_key(&self) -> PathBuf {
        meridian_cluster::certs::ca_key_beside(&self.pki)
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.tmp.path().join(format!("node-{id}"))
    }

    pub fn node(&self, id: u64) -> &Proc {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    fn node_mut(&mut self, id: u64) -> &mut Proc {
        self.nodes
            .get_mut(&id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Starts (or restarts, on the same data) node `id` and waits for its readiness line. Its
    /// stdout and stderr go to its log file (appended across restarts).
    pub async fn start(&mut self, id: u64) {
        let bin = self.bin.clone();
        let raft =
            (self.sockets(id).raft.try_clone()).unwrap_or_else(|e| panic!("the Raft socket: {e}"));
        let skew = (self.skew.is_some()).then(|| (meridian_node::skew::ENV, self.skew_file()));
        let node = self.node_mut(id);
        assert!(node.child.is_none(), "node {id} is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap_or_else(|e| panic!("log file: {e}"));
        let offset = log.metadata().map_or(0, |m| m.len());
        let err = log.try_clone().unwrap_or_else(|e| panic!("log file: {e}"));
        let child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&node.config)
            .env("MERIDIAN_LOG", "info,openraft=warn")
            .env(ADMIN_TOKEN_ENV, ADMIN_TOKEN)
            .env("LISTEN_FDS", "1")
            .env_remove("LISTEN_PID")
            .envs(skew)
            .fd_mappings(vec![FdMapping {
                parent_fd: raft.into(),
                child_fd: 3,
            }])
            .unwrap_or_else(|e| panic!("hand over the Raft socket: {e}"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn meridian: {e}"));
        node.child = Some(child);
        node.frozen = false;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read(&node.log).unwrap_or_default();
            let new = String::from_utf8_lossy(&text[(offset as usize).min(text.len())..]);
            if new.lines().any(|l| l.starts_with("meridian ready")) {
                return;
            }
            if let Some(child) = node.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("node {id} exited before it was ready ({status}):\n{new}");
            }
            assert!(
                Instant::now() < deadline,
                "node {id} not ready in 30 s:\n{new}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops node `id` as an operator does (SIGTERM: it drains, then exits) and waits (up to
    /// 30 s) for it; its exit status.
    pub async fn stop(&mut self, id: u64) -> std::process::ExitStatus {
        let node = self.node_mut(id);
        node.signal("-TERM");
        let mut child = node
            .child
            .take()
            .unwrap_or_else(|| panic!("node {id} is not running"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not stop within 30 s of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9` node `id` and reaps it.
    pub fn kill(&mut self, id: u64) {
        let node = self.node_mut(id);
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        node.frozen = false;
    }

    /// Freezes node `id` (SIGSTOP): it holds its sockets but answers nothing.
    pub fn freeze(&mut self, id: u64) {
        let node = self.node_mut(id);
        node.signal("-STOP");
        node.frozen = true;
    }

    /// Thaws a frozen node (SIGCONT).
    pub fn thaw(&mut self, id: u64) {
        let node = self.node_mut(id);
        node.signal("-CONT");
        node.frozen = false;
    }

    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.is_running() && !n.frozen)
            .map(|n| n.id)
            .collect()
    }

    pub async fn admin(&self, id: u64) -> Option<Admin> {
        admin_at(&self.node(id).admin(), Duration::from_millis(500))
            .await
            .ok()
    }

    pub async fn status(&self, id: u64) -> Option<ClusterStatusResponse> {
        let mut admin = self.admin(id).await?;
        Some(
            admin
                .cluster_status(ClusterStatusRequest {})
                .await
                .ok()?
                .into_inner(),
        )
    }

    /// Polls until every node in `ids` names the same leader (other than `not`), sees every
    /// node of `ids` in the member table, and returns it.
    pub async fn agreed_leader(&self, ids: &[u64], not: Option<u64>, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            for &id in ids {
                let s = self.status(id).await;
                let complete = s
                    .as_ref()
                    .is_some_and(|s| ids.iter().all(|i| s.members.iter().any(|m| m.id == *i)));
                leaders.push(s.filter(|_| complete).and_then(|s| s.leader));
            }
            if let Some(Some(l)) = leaders.first().copied()
                && leaders.iter().all(|x| *x == Some(l))
                && Some(l) != not
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader within {timeout:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Polls `cond` until it returns `Some`, or panics naming `what` after `timeout`.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, timeout: Duration, mut cond: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = cond().await {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for each node of `ids` in turn until `holds` for it, or panics naming the node and
    /// `what` (`"to serve"`: "node 2 to serve") after `timeout` on one node.
    pub async fn wait_each<F, Fut>(&self, ids: &[u64], what: &str, timeout: Duration, holds: F)
    where
        F: Fn(u64) -> Fut,
        Fut: Future<Output = bool>,
    {
        for &id in ids {
            self.wait_for(&format!("node {id} {what}"), timeout, || {
                let held = holds(id);
                async move { held.await.then_some(()) }
            })
            .await;
        }
    }

    /// Polls `holds` on every node of `ids` at once until it holds on each, and returns how
    /// long after `since` it held on the last; fails if any node is past `since + bound`.
    pub async fn all_within<F, Fut>(
        &self,
        ids: &[u64],
        what: &str,
        since: Instant,
        bound: Duration,
        holds: F,
    ) -> Duration
    where
        F: Fn(u64) -> Fut,
        Fut: Future<Output = bool>,
    {
        let holds = &holds;
        let each = ids.iter().map(|&id| async move {
            loop {
                let asked = since.elapsed();
                if holds(id).await {
                    // Counted from when the check that found it was made.
                    return asked;
                }
                assert!(
                    since.elapsed() <= bound,
                    "node {id}: {what}: not within {bound:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let slowest = futures::future::join_all(each)
            .await
            .into_iter()
            .max()
            .unwrap_or_default();
        assert!(slowest <= bound, "{what}: {slowest:?}, over {bound:?}");
        slowest
    }

    /// Creates tier `free` (idempotent) through node `id`, retrying for up to 10 s while the
    /// node is unreachable or the cluster has no leader (as an operator would: a loaded
    /// machine can hold an election right after boot).
    pub async fn put_tier(&self, id: u64) -> Result<bool, tonic::Status> {
        self.put_tier_with(id, crate::limit::tokens_per_day(10_000))
            .await
    }

    /// Tier `free` with `limits`, written through node `id` (see [`Self::put_tier`]).
    pub async fn put_tier_with(&self, id: u64, limits: pb::Limits) -> Result<bool, tonic::Status> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let result = match self.admin(id).await {
                None => Err(tonic::Status::unavailable("unreachable")),
                Some(mut admin) => admin
                    .put_tier(pb::PutTierRequest {
                        tier: Some(crate::tier("free", limits)),
                    })
                    .await
                    .map(|r| r.into_inner().changed),
            };
            match result {
                Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// Writes tenant `name` (tier `free`) through node `id`: a replicated write, acknowledged
    /// once committed. Retried like [`Self::put_tier`] (the write is idempotent).
    pub async fn put_tenant(&self, id: u64, name: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match put_tenant_at(&self.node(id).admin(), name).await {
                Err(e) if Instant::now() < deadline => {
                    eprintln!("put_tenant via node {id}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// A new API key for `tenant`, made through node `id`.
    pub async fn api_key(&self, id: u64, tenant: &str) -> Result<String, String> {
        let mut admin = self
            .admin(id)
            .await
            .ok_or_else(|| format!("node {id}'s admin API does not answer"))?;
        admin
            .create_api_key(meridian_proto::pb::admin::CreateApiKeyRequest {
                tenant: tenant.into(),
                label: String::new(),
            })
            .await
            .map(|r| r.into_inner().secret)
            .map_err(|e| e.to_string())
    }

    /// The tenants node `id` has applied.
    pub async fn tenants(&self, id: u64) -> Option<Vec<String>> {
        let mut admin = self.admin(id).await?;
        let list = admin
            .list_tenants(ListTenantsRequest::default())
            .await
            .ok()?
            .into_inner();
        Some(list.tenants.into_iter().map(|t| t.id).collect())
    }

    /// Waits until every node in `ids` has applied every tenant in `names`.
    pub async fn wait_replicated(&self, ids: &[u64], names: &[String], timeout: Duration) {
        for &id in ids {
            self.wait_for(
                &format!("node {id} to hold all {} acknowledged writes", names.len()),
                timeout,
                || async move {
                    let have = self.tenants(id).await?;
                    names.iter().all(|n| have.contains(n)).then_some(())
                },
            )
            .await;
        }
    }

    /// The rows of node `id`'s `meridian admin usage report` with `args` (`--days`, `--by`, …),
    /// in JSON.
    pub fn usage_report(&self, id: u64, args: &[&str]) -> Vec<serde_json::Value> {
        let mut all = vec!["usage", "report", "--format", "json"];
        all.extend_from_slice(args);
        let out = self.cli(id, &all);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("the report is not JSON ({e}): {out}"));
        v["rows"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("a report without rows: {out}"))
    }

    /// Runs `meridian admin --addr <node id's admin> ARGS…` and returns its stdout; panics with
    /// its stderr if it fails.
    pub fn cli(&self, id: u64, args: &[&str]) -> String {
        let out = Command::new(&self.bin)
            .args([
                "admin",
                "--addr",
                &self.node(id).admin(),
                "--token",
                ADMIN_TOKEN,
            ])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run meridian admin: {e}"));
        assert!(
            out.status.success(),
            "meridian admin {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a client that writes tenants `PREFIX-0`, `PREFIX-1`, … one after another, each
    /// through the next node of `ids` in turn (moving on when a node fails to answer), and
    /// records which writes were acknowledged and when.
    pub fn steady_writes(&self, ids: &[u64], prefix: &str) -> SteadyWrites {
        let admins: Vec<String> = ids.iter().map(|id| self.node(*id).admin()).collect();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let acked = Arc::clone(&acked);
            let stop = Arc::clone(&stop);
            let prefix = prefix.to_owned();
            async move {
                let mut target = 0usize;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("{prefix}-{n}");
                    let admin = &admins[target % admins.len()];
                    match put_tenant_at(admin, &name).await {
                        Ok(()) => {
                            lock(&acked).push((name, Instant::now()));
                            n += 1;
                        }
                        // Not acknowledged: it may or may not have committed. Try the next node;
                        // a retry of the same name is harmless (an upsert).
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                    target += 1;
                }
            }
        });
        SteadyWrites { acked, stop, task }
    }

    fn print_logs(&self) {
        for node in self.nodes.values() {
            let text = std::fs::read_to_string(&node.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- node {} log ({}), last lines:",
                node.id,
                node.log.display()
            );
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        // SIGKILL ends frozen processes too.
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

/// A running [`Harness::steady_writes`] client.
pub struct SteadyWrites {
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl SteadyWrites {
    pub fn acked(&self) -> usize {
        lock(&self.acked).len()
    }

    /// The writes acknowledged so far.
    pub fn acked_names(&self) -> Vec<String> {
        lock(&self.acked).iter().map(|(n, _)| n.clone()).collect()
    }

    /// Waits until `n` more writes than now are acknowledged.
    pub async fn wait_more(&self, n: usize, timeout: Duration) {
        let target = self.acked() + n;
        let deadline = Instant::now() + timeout;
        while self.acked() < target {
            assert!(
                Instant::now() < deadline,
                "writes stalled: {} of {target} acknowledged after {timeout:?}",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the client; returns every acknowledged write and the longest gap between two
    /// acknowledgements after `since` (the write outage a client saw).
    pub async fn finish(self, since: Instant) -> (Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let acked = std::mem::take(&mut *lock(&self.acked));
        let mut gap = Duration::ZERO;
        let mut last = since;
        for (_, at) in acked.iter().filter(|(_, at)| *at >= since) {
            gap = gap.max(at.duration_since(last));
            last = *at;
        }
        (acked.into_iter().map(|(n, _)| n).collect(), gap)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An admin API client with the harness's admin token.
pub type Admin = AdminClient<InterceptedService<Channel, Bearer>>;

async fn admin_at(url: &str, connect_timeout: Duration) -> Result<Admin, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| e.to_string())?
        .connect_timeout(connect_timeout)
        .timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    Ok(AdminClient::with_interceptor(
        channel,
        Bearer::new(Some(ADMIN_TOKEN)),
    ))
}

async fn put_tenant_at(admin: &str, name: &str) -> Result<(), String> {
    let mut client = admin_at(admin, Duration::from_millis(300)).await?;
    client
        .put_tenant(pb::PutTenantRequest {
            tenant: Some(crate::tenant(name, "free")),
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
