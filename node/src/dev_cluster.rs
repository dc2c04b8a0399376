//! `meridian dev cluster`: a local cluster in one command, for trying Raft, failover and
//! cluster-wide limits in a minute. It makes the cluster CA and the nodes' certificates, writes
//! one config per node (all on 127.0.0.1, ports from `--port-base`), starts the nodes as child
//! processes of this one (logs in the folder), waits until they agree on a leader, makes a
//! tenant `dev` with an API key, prints the URLs, the admin token and the key, and stops every
//! node (each drains) on Ctrl-C or SIGTERM — or when one of them exits.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meridian_proto::pb::admin::{self as pb, admin_client::AdminClient};
use tokio::process::{Child, Command};

/// The ports of node `id` (1-based) from `base`: HTTP `base+id`, gRPC `base+100+id`, admin
/// `base+200+id`, Raft over QUIC `base+300+2·id` (the actor mesh takes the next port).
struct Ports {
    http: u16,
    grpc: u16,
    admin: u16,
    quic: u16,
}

impl Ports {
    fn of(base: u16, id: u16) -> anyhow::Result<Self> {
        let at = |offset: u16| {
            base.checked_add(offset)
                .context("--port-base leaves no room for the nodes' ports (at most 65,200)")
        };
        Ok(Self {
            http: at(id)?,
            grpc: at(100 + id)?,
            admin: at(200 + id)?,
            quic: at(300 + 2 * id)?,
        })
    }
}

/// The environment variable the nodes read the shared admin token from.
const TOKEN_ENV: &str = "MERIDIAN_DEV_CLUSTER_ADMIN_TOKEN";

pub async fn run(nodes: u16, dir: PathBuf, port_base: u16) -> anyhow::Result<()> {
    if !(1..=7).contains(&nodes) {
        bail!("--nodes must be between 1 and 7, got {nodes}");
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    let certs = dir.join("certs");
    // The CA key beside the certs the nodes read, not among them.
    let ca_key = dir.join("ca.key");
    if !ca_key.exists() {
        meridian_cluster::certs::init_ca(&certs, &ca_key)?;
    }
    let ids: Vec<u16> = (1..=nodes).collect();
    for &id in &ids {
        if !certs.join(format!("node-{id}.key")).exists() {
            meridian_cluster::certs::issue(&certs, &ca_key, u64::from(id), &["127.0.0.1".into()])?;
        }
        write_config(&dir, &certs, id, &ids, port_base)?;
    }
    let token = admin_token(&dir)?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let mut children = Vec::new();
    for &id in &ids {
        let log = std::fs::File::create(dir.join(format!("node-{id}.log")))
            .context("cannot create a node's log file")?;
        let child = Command::new(&exe)
            .arg("serve")
            .arg("--config")
            .arg(dir.join(format!("node-{id}.toml")))
            .env(TOKEN_ENV, &token)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start node {id}"))?;
        children.push((id, child));
    }
    let started = Instant::now();
    let leader = match agreed_leader(&ids, port_base, &token, &mut children).await {
        Ok(l) => l,
        Err(e) => {
            stop(&mut children).await;
            return Err(e.context(format!("see the node logs in {}", dir.display())));
        }
    };
    let key = match dev_key(port_base, leader, &token).await {
        // Printed once every node has applied it: any node then takes it.
        Ok(k) => match all_applied(&ids, port_base, leader, &token).await {
            Ok(()) => k,
            Err(e) => {
                stop(&mut children).await;
                return Err(e);
            }
        },
        Err(e) => {
            stop(&mut children).await;
            return Err(e);
        }
    };
    println!(
        "meridian dev cluster: {nodes} node(s) up in {:.1} s, node {leader} leads (folder {})",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    for &id in &ids {
        let p = Ports::of(port_base, id)?;
        println!(
            "  node {id}: http://127.0.0.1:{}  grpc 127.0.0.1:{}  admin http://127.0.0.1:{}  log {}",
            p.http,
            p.grpc,
            p.admin,
            dir.join(format!("node-{id}.log")).display()
        );
    }
    let first = Ports::of(port_base, 1)?;
    println!("admin token: {token}");
    println!("API key (tenant dev): {key}");
    println!(
        "try: curl -s http://127.0.0.1:{}/v1/chat/completions -H 'authorization: Bearer {key}' \
         -H 'content-type: application/json' -d '{{\"model\":\"demo\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'",
        first.http
    );
    println!(
        "     meridian admin --addr http://127.0.0.1:{} --token {token} cluster",
        first.admin
    );
    println!("Ctrl-C stops every node.");
    let ended = wait_any(&mut children);
    tokio::select! {
        () = crate::shutdown_signal() => {}
        id = ended => println!("node {id} exited; stopping the others"),
    }
    stop(&mut children).await;
    println!("meridian dev cluster stopped");
    Ok(())
}

fn write_config(dir: &Path, certs: &Path, id: u16, ids: &[u16], base: u16) -> anyhow::Result<()> {
    let p = Ports::of(base, id)?;
    let peers: Vec<String> = ids
        .iter()
        .filter(|&&other| other != id)
        .map(|&other| Ports::of(base, other).map(|o| format!("\"{other}@localhost:{}\"", o.quic)))
        .collect::<anyhow::Result<_>>()?;
    let single = ids.len() == 1;
    let cluster = if single {
        String::new()
    } else {
        format!(
            "[cluster]\nlisten = \"127.0.0.1:{quic}\"\nadvertise = \"localhost:{quic}\"\n\
             mesh_listen = \"127.0.0.1:{mesh}\"\n\
             certs_dir = {certs:?}\npeers = [{peers}]\n\
             heartbeat = \"100ms\"\nelection_timeout_min = \"500ms\"\nelection_timeout_max = \"1s\"\n",
            quic = p.quic,
            mesh = p.quic + 1,
            peers = peers.join(", "),
        )
    };
    let text = format!(
        "# Written by `meridian dev cluster`.\n[node]\nid = {id}\nregion = \"local\"\n\
         data_dir = {data:?}\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n\n[grpc]\n\
         listen = \"127.0.0.1:{grpc}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         token_env = \"{TOKEN_ENV}\"\n\n[shutdown]\ndrain_timeout = \"5s\"\n\n{cluster}\n\
         [[providers]]\nid = \"demo\"\nkind = \"demo\"\nmodels = [\"demo\"]\n",
        data = dir.join(format!("node-{id}")),
        http = p.http,
        grpc = p.grpc,
        admin = p.admin,
    );
    std::fs::write(dir.join(format!("node-{id}.toml")), text)
        .context("cannot write a node's config")?;
    Ok(())
}

/// The cluster's admin token: kept in the folder (0600) so a restarted dev cluster keeps it.
fn admin_token(dir: &Path) -> anyhow::Result<String> {
    let file = dir.join("admin.token");
    if let Ok(t) = std::fs::read_to_string(&file) {
        return Ok(t.trim().to_owned());
    }
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    let token = meridian_proto::ids::hex(&bytes);
    meridian_node::app::save_secret(dir, "admin.token", &token)
        .context("cannot save the admin token")?;
    Ok(token)
}

async fn admin(
    base: u16,
    id: u16,
    token: &str,
) -> anyhow::Result<
    AdminClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            impl tonic::service::Interceptor,
        >,
    >,
> {
    let p = Ports::of(base, id)?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", p.admin))?
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await?;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    Ok(AdminClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        },
    ))
}

/// Waits (up to 60 s) until every node answers and names the same leader.
async fn agreed_leader(
    ids: &[u16],
    base: u16,
    token: &str,
    children: &mut [(u16, Child)],
) -> anyhow::Result<u16> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (id, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("node {id} exited while starting ({status})");
            }
        }
        let mut leaders = Vec::new();
        for &id in ids {
            let status = match admin(base, id, token).await {
                Ok(mut c) => c.cluster_status(pb::ClusterStatusRequest {}).await.ok(),
                Err(_) => None,
            };
            leaders.push(status.and_then(|s| s.into_inner().leader));
        }
        if let Some(Some(first)) = leaders.first()
            && leaders.iter().all(|l| *l == Some(*first))
        {
            return u16::try_from(*first).context("a leader id out of range");
        }
        if Instant::now() > deadline {
            bail!("the nodes did not agree on a leader within 60 s (they said {leaders:?})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A tier and tenant `dev` (no limits) and an API key for it, made through the leader.
async fn dev_key(base: u16, leader: u16, token: &str) -> anyhow::Result<String> {
    let mut client = admin(base, leader, token).await?;
    client
        .put_tier(pb::PutTierRequest {
            tier: Some(pb::Tier {
                name: "dev".into(),
                ..pb::Tier::default()
            }),
        })
        .await
        .context("cannot make the dev tier")?;
    client
        .put_tenant(pb::PutTenantRequest {
            tenant: Some(pb::Tenant {
                id: "dev".into(),
                tier: "dev".into(),
                ..pb::Tenant::default()
            }),
        })
        .await
        .context("cannot make the dev tenant")?;
    let key = client
        .create_api_key(pb::CreateApiKeyRequest {
            tenant: "dev".into(),
            label: "meridian dev cluster".into(),
        })
        .await
        .context("cannot make an API key")?
        .into_inner();
    Ok(key.secret)
}

/// Waits (up to 30 s) until every node has applied what the leader has committed.
async fn all_applied(ids: &[u16], base: u16, leader: u16, token: &str) -> anyhow::Result<()> {
    let committed = admin(base, leader, token)
        .await?
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner()
        .commit_index
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    for &id in ids {
        loop {
            let applied = match admin(base, id, token).await {
                Ok(mut c) => c
                    .cluster_status(pb::ClusterStatusRequest {})
                    .await
                    .ok()
                    .and_then(|s| s.into_inner().applied_index),
                Err(_) => None,
            };
            if applied.is_some_and(|a| a >= committed) {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {id} did not apply the cluster's log within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Resolves with the id of the first node whose process ends.
async fn wait_any(children: &mut [(u16, Child)]) -> u16 {
    loop {
        for (id, child) in children.iter_mut() {
            if let Ok(Some(_)) = child.try_wait() {
                return *id;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM to every node still running (each drains), then waits for them; SIGKILL after 15 s.
async fn stop(children: &mut [(u16, Child)]) {
    for (_, child) in children.iter() {
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for (id, child) in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .is_err()
        {
            eprintln!("node {id} did not stop within 15 s; killing it");
            let _ = child.kill().await;
        }
    }
}
