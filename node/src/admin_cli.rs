//! `meridian admin …`: the operator's client of a node's admin gRPC API (`meridian.admin.v1`):
//! the subcommands, their arguments, and how each answer is printed.

mod commands;
mod usage;

use std::path::PathBuf;

use anyhow::Context;
pub use commands::*;
use meridian_proto::pb::admin::admin_client::AdminClient;
use meridian_proto::pb::admin::{
    self as admin_pb, ClusterStatusRequest, ListProvidersRequest, NodeStatusRequest,
};
pub use usage::UsageCommand;

pub async fn run(
    addr: String,
    token: Option<String>,
    token_file: PathBuf,
    tls: Tls,
    command: AdminCommand,
) -> anyhow::Result<()> {
    let token = match token {
        Some(t) => t,
        None => std::fs::read_to_string(&token_file)
            .map(|t| t.trim().to_owned())
            .with_context(|| {
                format!(
                    "no admin token: pass --token, set MERIDIAN_ADMIN_TOKEN, or point --token-file at the node's admin.token (tried {})",
                    token_file.display()
                )
            })?,
    };
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .context("the admin token has characters not allowed in a header")?;
    let mut endpoint = tonic::transport::Endpoint::from_shared(addr.clone())
        .with_context(|| format!("{addr} is not a URL"))?;
    if addr.starts_with("https://") {
        let mut config = tonic::transport::ClientTlsConfig::new();
        match &tls.ca_cert {
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read --ca-cert {}", path.display()))?;
                config = config.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            None => anyhow::bail!(
                "an https:// admin address needs --ca-cert (the CA that signed its certificate)"
            ),
        }
        if let Some(name) = &tls.tls_name {
            config = config.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .context("the admin API's TLS settings")?;
    } else if tls.ca_cert.is_some() {
        anyhow::bail!("--ca-cert applies to an https:// admin address");
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the admin API at {addr}"))?;
    let mut client = AdminClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", bearer.clone());
        Ok(req)
    });
    match command {
        AdminCommand::Reload => {
            let r = client
                .reload_config(admin_pb::ReloadConfigRequest {})
                .await?
                .into_inner();
            println!("reloaded: {}", meridian_node::reload::Reloaded::from(r));
        }
        AdminCommand::Status => {
            let s = client.node_status(NodeStatusRequest {}).await?.into_inner();
            println!(
                "node {} (region {}), version {}, up {} s, {} in flight{}\n  http {}  grpc {}",
                s.node_id,
                s.region,
                s.version,
                s.uptime_seconds,
                s.in_flight,
                if s.draining { ", draining" } else { "" },
                s.http_addr,
                s.grpc_addr
            );
        }
        AdminCommand::Cluster { command } => match command.unwrap_or(ClusterCommand::Status) {
            ClusterCommand::Status => {
                let c = client
                    .cluster_status(ClusterStatusRequest {})
                    .await?
                    .into_inner();
                let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
                println!(
                    "node {}: leader {}, term {}, last log {}, commit {}, applied {}, snapshot {}, purged {}",
                    c.node_id,
                    opt(c.leader),
                    c.term,
                    opt(c.last_log_index),
                    opt(c.commit_index),
                    opt(c.applied_index),
                    opt(c.snapshot_index),
                    opt(c.purged_index),
                );
                println!("  voters {:?}  learners {:?}", c.voters, c.learners);
                for m in c.members {
                    println!(
                        "  member {:<4} region {:<10} raft {:<21} http {}",
                        m.id, m.region, m.raft_addr, m.http_addr
                    );
                }
            }
            ClusterCommand::Mesh => {
                let m = client
                    .mesh_status(admin_pb::MeshStatusRequest {})
                    .await?
                    .into_inner();
                if !m.enabled {
                    println!("no actor mesh: this node runs a single-node cluster");
                }
                println!("connected: {}", m.connected.join(" "));
                for p in m.peers {
                    let providers: Vec<String> = p
                        .providers
                        .iter()
                        .map(|q| format!("{}({}/{})", q.id, q.in_flight, q.queued))
                        .collect();
                    println!(
                        "  node {} region {} answered via the mesh; providers {}",
                        p.node_id,
                        p.region,
                        providers.join(" ")
                    );
                }
                for e in m.errors {
                    println!("  no answer: {e}");
                }
            }
            ClusterCommand::State {
                section,
                prefix,
                limit,
            } => {
                let mut after = String::new();
                let mut left = limit.map(u64::from);
                loop {
                    let page = client
                        .cluster_state(admin_pb::ClusterStateRequest {
                            section: section.clone().unwrap_or_default(),
                            prefix: prefix.clone(),
                            after: after.clone(),
                            limit: left.map_or(0, |l| l.min(10_000) as u32),
                        })
                        .await?
                        .into_inner();
                    println!("{}", page.json);
                    if let Some(l) = &mut left {
                        let got =
                            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(
                                &page.json,
                            )
                            .map_or(0, |m| m.len() as u64);
                        *l = l.saturating_sub(got);
                    }
                    if page.next_after.is_empty() || left == Some(0) {
                        break;
                    }
                    after = page.next_after;
                }
            }
            ClusterCommand::AddLearner { node, raft_addr } => {
                let r = client
                    .add_learner(admin_pb::AddLearnerRequest {
                        node_id: node,
                        raft_addr,
                    })
                    .await?;
                print_change(r.into_inner(), &format!("node {node} added as a learner"));
            }
            ClusterCommand::Promote { node } => {
                let r = client
                    .promote_voter(admin_pb::PromoteVoterRequest { node_id: node })
                    .await?;
                print_change(r.into_inner(), &format!("node {node} is a voter"));
            }
            ClusterCommand::Remove { node } => {
                let r = client
                    .remove_member(admin_pb::RemoveMemberRequest { node_id: node })
                    .await?;
                print_change(r.into_inner(), &format!("node {node} removed"));
            }
            ClusterCommand::RevokeCert { cert, node } => {
                let fingerprint = meridian_cluster::certs::fingerprint_file(&cert)
                    .with_context(|| format!("cannot read the certificate {}", cert.display()))?;
                let r = client
                    .revoke_certificate(admin_pb::RevokeCertificateRequest {
                        fingerprint_sha256: fingerprint.clone(),
                        node_id: node,
                    })
                    .await?;
                print_change(
                    r.into_inner(),
                    &format!("certificate {fingerprint} of node {node} revoked"),
                );
            }
        },
        AdminCommand::Tier {
            command:
                TierCommand::Put {
                    name,
                    limits,
                    per_user,
                },
        } => {
            let r = client
                .put_tier(admin_pb::PutTierRequest {
                    tier: Some(admin_pb::Tier {
                        name: name.clone(),
                        limits: Some(limits.into_pb()?),
                        per_user: per_user.as_deref().map(parse_limits).transpose()?,
                    }),
                })
                .await?;
            print_change(r.into_inner(), &format!("tier {name} saved"));
        }
        AdminCommand::Key { command } => match command {
            KeyCommand::Create { tenant, label } => {
                let k = client
                    .create_api_key(admin_pb::CreateApiKeyRequest {
                        tenant: tenant.clone(),
                        label,
                    })
                    .await?
                    .into_inner();
                println!(
                    "key {} for tenant {tenant} (shown once):\n{}",
                    k.key_id, k.secret
                );
            }
            KeyCommand::List { tenant } => {
                let mut keys = Vec::new();
                let mut after = String::new();
                loop {
                    let page = client
                        .list_api_keys(admin_pb::ListApiKeysRequest {
                            tenant: tenant.clone(),
                            after,
                            limit: 0,
                        })
                        .await?
                        .into_inner();
                    keys.extend(page.keys);
                    if page.next_after.is_empty() {
                        break;
                    }
                    after = page.next_after;
                }
                for k in keys {
                    println!(
                        "{}  tenant {:<20} {}{}",
                        k.key_id,
                        k.tenant,
                        if k.revoked_at_unix_ms.is_some() {
                            "revoked "
                        } else {
                            "active  "
                        },
                        k.label
                    );
                }
            }
            KeyCommand::Revoke { key_id } => {
                let r = client
                    .revoke_api_key(admin_pb::RevokeApiKeyRequest {
                        key_id: key_id.clone(),
                    })
                    .await?;
                print_change(r.into_inner(), &format!("key {key_id} revoked"));
            }
        },
        AdminCommand::Breaker { command } => {
            let set = |provider: String, action: admin_pb::BreakerAction, reason: String| {
                admin_pb::SetBreakerRequest {
                    provider,
                    action: action as i32,
                    reason,
                }
            };
            let (request, done) = match command.unwrap_or(BreakerCommand::List) {
                BreakerCommand::List => {
                    let l = client
                        .list_breakers(admin_pb::ListBreakersRequest {})
                        .await?
                        .into_inner();
                    if l.breakers.is_empty() {
                        println!("no breaker has tripped or been set");
                    }
                    for b in l.breakers {
                        let until = b
                            .open_until_unix_ms
                            .filter(|u| *u != u64::MAX)
                            .map(|u| format!(" until {u}"))
                            .unwrap_or_default();
                        println!(
                            "{:<24} {:<9}{}{} trips {}  by node {}  {}",
                            b.provider,
                            b.state,
                            if b.forced { " (forced)" } else { "" },
                            until,
                            b.trips,
                            b.by_node,
                            b.reason
                        );
                    }
                    return Ok(());
                }
                BreakerCommand::Open { provider, reason } => (
                    set(provider.clone(), admin_pb::BreakerAction::ForceOpen, reason),
                    format!("breaker {provider} forced open"),
                ),
                BreakerCommand::Close { provider, reason } => (
                    set(
                        provider.clone(),
                        admin_pb::BreakerAction::ForceClosed,
                        reason,
                    ),
                    format!("breaker {provider} forced closed"),
                ),
                BreakerCommand::Reset { provider } => (
                    set(
                        provider.clone(),
                        admin_pb::BreakerAction::Reset,
                        String::new(),
                    ),
                    format!("breaker {provider} reset"),
                ),
            };
            let r = client.set_breaker(request).await?;
            print_change(r.into_inner(), &done);
        }
        AdminCommand::Usage { command } => {
            if let Some(request) = command.calls_request() {
                let calls = client.list_calls(request).await?.into_inner().calls;
                usage::print_calls(&calls);
            }
            if let Some(asked) = command.report_request() {
                let report = client.usage_report(asked.request).await?.into_inner();
                usage::print_report(&report, asked.format)?;
            }
        }
        AdminCommand::Vllm { command } => {
            let control = |replica: String, action: admin_pb::ReplicaAction| {
                admin_pb::ControlReplicaRequest {
                    replica,
                    action: action as i32,
                }
            };
            let answer = match command.unwrap_or(VllmCommand::List) {
                VllmCommand::List => {
                    let l = client
                        .list_replicas(admin_pb::ListReplicasRequest {})
                        .await?
                        .into_inner();
                    if l.replicas.is_empty() {
                        println!("this node supervises no vLLM replica");
                    }
                    for r in l.replicas {
                        print_replica(&r);
                    }
                    return Ok(());
                }
                VllmCommand::Drain { replica } => {
                    client
                        .control_replica(control(replica, admin_pb::ReplicaAction::Drain))
                        .await?
                }
                VllmCommand::Stop { replica } => {
                    client
                        .control_replica(control(replica, admin_pb::ReplicaAction::Stop))
                        .await?
                }
                VllmCommand::Start { replica } => {
                    client
                        .control_replica(control(replica, admin_pb::ReplicaAction::Start))
                        .await?
                }
                VllmCommand::Restart { replica } => {
                    client
                        .control_replica(control(replica, admin_pb::ReplicaAction::Restart))
                        .await?
                }
                VllmCommand::LoraLoad {
                    replica,
                    name,
                    path,
                } => {
                    client
                        .lora_adapter(admin_pb::LoraAdapterRequest {
                            replica,
                            name,
                            path,
                        })
                        .await?
                }
                VllmCommand::LoraUnload { replica, name } => {
                    client
                        .lora_adapter(admin_pb::LoraAdapterRequest {
                            replica,
                            name,
                            path: String::new(),
                        })
                        .await?
                }
            };
            println!("{}", answer.into_inner().message);
        }
        AdminCommand::Tenant { command } => match command {
            TenantCommand::Put {
                id,
                tier,
                overrides,
                per_user,
                features,
                regions,
                models,
                weight,
                engine_fields,
            } => {
                let r = client
                    .put_tenant(admin_pb::PutTenantRequest {
                        tenant: Some(admin_pb::Tenant {
                            id: id.clone(),
                            tier,
                            overrides: Some(overrides.into_pb()?),
                            per_user: per_user.as_deref().map(parse_limits).transpose()?,
                            features: features
                                .iter()
                                .map(|f| {
                                    let (name, spec) = f.split_once(':').with_context(|| {
                                        format!("--feature {f:?} is not NAME:LIMIT=N,…")
                                    })?;
                                    Ok((name.to_owned(), parse_limits(spec)?))
                                })
                                .collect::<anyhow::Result<_>>()?,
                            regions,
                            models,
                            weight,
                            created_at_unix_ms: 0,
                            updated_at_unix_ms: 0,
                            engine_fields,
                        }),
                    })
                    .await?;
                print_change(r.into_inner(), &format!("tenant {id} saved"));
            }
            TenantCommand::List => {
                let mut l = client
                    .list_tenants(admin_pb::ListTenantsRequest::default())
                    .await?
                    .into_inner();
                while !l.next_after.is_empty() {
                    let page = client
                        .list_tenants(admin_pb::ListTenantsRequest {
                            after: std::mem::take(&mut l.next_after),
                            limit: 0,
                        })
                        .await?
                        .into_inner();
                    l.tenants.extend(page.tenants);
                    l.next_after = page.next_after;
                }
                for t in l.tiers {
                    println!("tier   {:<20} {}", t.name, limits(t.limits));
                }
                for t in l.tenants {
                    let list = |v: &[String]| match v {
                        [] => "any".to_owned(),
                        v => v.join(","),
                    };
                    let mut line = format!(
                        "tenant {:<20} tier {:<12} regions {} models {} weight {}",
                        t.id,
                        t.tier,
                        list(&t.regions),
                        list(&t.models),
                        t.weight.max(1),
                    );
                    for (what, l) in [("limits", t.overrides), ("per-user", t.per_user)] {
                        let l = limits(l);
                        if !l.is_empty() {
                            line.push_str(&format!(" {what} {l}"));
                        }
                    }
                    for (name, l) in t.features {
                        line.push_str(&format!(" feature {name}: {}", limits(Some(l))));
                    }
                    println!("{line}");
                }
            }
        },
        AdminCommand::Providers => {
            let list = client
                .list_providers(ListProvidersRequest {})
                .await?
                .into_inner();
            println!(
                "{:<16} {:<7} {:<10} {:>9} {:>7} {:>9} {:>9} {:>8}  models",
                "id", "kind", "region", "in-flight", "queued", "requests", "failures", "restarts"
            );
            for p in list.providers {
                println!(
                    "{:<16} {:<7} {:<10} {:>4}/{:<4} {:>3}/{:<3} {:>9} {:>9} {:>8}  {}",
                    p.id,
                    p.kind,
                    p.region,
                    p.in_flight,
                    p.max_concurrency,
                    p.queued,
                    p.queue_capacity,
                    p.requests_total,
                    p.failures_total,
                    p.restarts,
                    p.models.join(",")
                );
            }
        }
    }
    Ok(())
}

/// `tokens_per_minute=2000,requests_per_minute=20` as limits; costs in USD
/// (`cost_per_day_usd=1.5`).
fn parse_limits(spec: &str) -> anyhow::Result<admin_pb::Limits> {
    let mut l = admin_pb::Limits::default();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("{part:?} is not LIMIT=N"))?;
        let n = || {
            v.parse::<u64>()
                .with_context(|| format!("{k}: {v:?} is not a whole number"))
        };
        match k {
            "requests_per_minute" => l.requests_per_minute = Some(n()?),
            "tokens_per_minute" => l.tokens_per_minute = Some(n()?),
            "tokens_per_day" => l.tokens_per_day = Some(n()?),
            "tokens_per_month" => l.tokens_per_month = Some(n()?),
            "cost_per_day_usd" => {
                let usd: f64 = v
                    .parse()
                    .with_context(|| format!("{k}: {v:?} is not a number"))?;
                anyhow::ensure!((0.0..=1e9).contains(&usd), "{k} must be between 0 and 1e9");
                l.cost_per_day_micro_usd = Some((usd * 1e6).round() as u64);
            }
            other => anyhow::bail!(
                "{other:?} is not a limit (requests_per_minute, tokens_per_minute, tokens_per_day, tokens_per_month, cost_per_day_usd)"
            ),
        }
    }
    Ok(l)
}

fn print_change(r: admin_pb::ChangeResponse, done: &str) {
    if !r.changed {
        println!("{done} (already so; nothing changed)");
    } else if r.changes.is_empty() {
        println!("{done}");
    } else {
        println!("{done}; changed:");
        for change in r.changes {
            println!("  {change}");
        }
    }
}

/// `tokens_per_day=5000 …`, only the limits that are set.
fn limits(l: Option<admin_pb::Limits>) -> String {
    let l = l.unwrap_or_default();
    [
        ("requests_per_minute", l.requests_per_minute),
        ("tokens_per_minute", l.tokens_per_minute),
        ("tokens_per_day", l.tokens_per_day),
        ("tokens_per_month", l.tokens_per_month),
        ("cost_per_day_micro_usd", l.cost_per_day_micro_usd),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
    .collect::<Vec<_>>()
    .join(" ")
}

/// One line per replica for `meridian admin vllm list`.
fn print_replica(r: &admin_pb::Replica) {
    let secs = |ms: u64| format!("{:.1}s", ms as f64 / 1000.0);
    let state = match r.life() {
        admin_pb::ReplicaLife::Starting => {
            format!("starting (loading for {})", secs(r.state_for_ms))
        }
        admin_pb::ReplicaLife::Ready => format!("ready (up {})", secs(r.uptime_ms)),
        _ => format!("{} (for {})", r.state, secs(r.state_for_ms)),
    };
    let gpus = if r.gpus.is_empty() {
        "-".to_owned()
    } else {
        r.gpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    println!(
        "{:<16} {:<30} gpus {:<7} port {:<5} pid {:<7} restarts {:<3} in-flight {:<4} running {:<4} waiting {:<4} kv {:>5.1}%  models {}{}",
        r.name,
        state,
        gpus,
        r.port,
        if r.pid == 0 {
            "-".to_owned()
        } else {
            r.pid.to_string()
        },
        r.restarts,
        r.in_flight,
        r.running,
        r.waiting,
        r.kv_cache_usage * 100.0,
        r.models.join(","),
        if r.last_exit.is_empty() {
            String::new()
        } else {
            format!("  last exit: {}", r.last_exit)
        }
    );
}
