//! The admin gRPC service (its own port): node, providers, cluster status and state, membership,
//! tiers and tenants, API keys. Every call needs the admin token (`authorization: Bearer …`,
//! checked by the interceptor in `app.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_actors::mesh::Mesh;
use meridian_actors::vllm::{ControlError, ReplicaState};

use meridian_actors::Gateway;
use meridian_actors::auth;
use meridian_cluster::raft::{ClusterError, ClusterNode};
use meridian_proto::cluster::{
    ApiKeyRecord, Applied, BreakerState, Command, ProviderKind, Tenant, Tier, changed_fields,
};
use meridian_proto::convert::invalid_name;
use meridian_proto::pb::admin as pb;
use meridian_proto::pb::admin::admin_server::Admin;
use tonic::{Request, Response, Status};

use pages::{Page, after_key, ledger_page, next_page, page_limit, page_of};

pub struct AdminService {
    pub gateway: Gateway,
    pub vllm: meridian_actors::vllm::supervisor::Vllm,
    pub cluster: ClusterNode,
    pub node_id: u64,
    pub region: String,
    pub started: Instant,
    pub http_addr: String,
    pub grpc_addr: String,
    /// The actor mesh (multi-node only).
    pub mesh: Option<Arc<Mesh>>,
    /// The call log's file (`None`: the node keeps no call log).
    pub calls: Option<std::path::PathBuf>,
    /// Reloads the configuration file (`None`: started without one).
    pub reloader: Option<crate::reload::Reloader>,
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn node_status(
        &self,
        _req: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatusResponse>, Status> {
        Ok(Response::new(pb::NodeStatusResponse {
            node_id: self.node_id,
            region: self.region.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: self.started.elapsed().as_secs(),
            in_flight: self.gateway.in_flight(),
            draining: self.gateway.is_draining(),
            http_addr: self.http_addr.clone(),
            grpc_addr: self.grpc_addr.clone(),
        }))
    }

    async fn list_providers(
        &self,
        _req: Request<pb::ListProvidersRequest>,
    ) -> Result<Response<pb::ListProvidersResponse>, Status> {
        let providers = self
            .gateway
            .providers()
            .into_iter()
            .map(|p| pb::ProviderStatus {
                id: p.id,
                kind: p.kind.to_string(),
                upstream: upstream_kind(&p.kind) as i32,
                region: p.region,
                models: p.models,
                max_concurrency: p.max_concurrency,
                in_flight: p.in_flight,
                queued: p.queued,
                queue_capacity: p.queue_capacity,
                requests_total: p.requests_total,
                failures_total: p.failures_total,
                restarts: p.restarts,
            })
            .collect();
        Ok(Response::new(pb::ListProvidersResponse { providers }))
    }

    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let s = self.cluster.status();
        let members = self
            .cluster
            .state()
            .borrow()
            .members
            .values()
            .map(|m| pb::ClusterMember {
                id: m.id,
                region: m.region.clone(),
                raft_addr: m.raft_addr.clone(),
                http_addr: m.http_addr.clone(),
                mesh_addr: m.mesh_addr.clone(),
            })
            .collect();
        Ok(Response::new(pb::ClusterStatusResponse {
            node_id: s.id,
            leader: s.leader,
            term: s.term,
            last_log_index: s.last_log_index,
            applied_index: s.applied_index,
            snapshot_index: s.snapshot_index,
            purged_index: s.purged_index,
            voters: s.voters,
            members,
            commit_index: s.commit_index,
            learners: s.learners,
            millis_since_quorum_ack: s.millis_since_quorum_ack,
        }))
    }

    async fn cluster_state(
        &self,
        req: Request<pb::ClusterStateRequest>,
    ) -> Result<Response<pb::ClusterStateResponse>, Status> {
        let r = req.into_inner();
        let state = Arc::clone(&self.cluster.state().borrow());
        let limit = page_limit(r.limit);
        let page = |what: Page| -> Result<(String, String), Status> {
            let (records, next) = what;
            let json =
                serde_json::to_string(&records).map_err(|e| Status::internal(e.to_string()))?;
            Ok((json, next))
        };
        // A replica's key is for the nodes that call it, not for the admin API.
        let shown_providers = || {
            let mut shown = state.providers.clone();
            for (id, record) in state.providers.iter() {
                if !record.api_key.is_empty() {
                    let mut record = record.clone();
                    record.api_key = "<redacted>".into();
                    shown.insert(id.clone(), record);
                }
            }
            shown
        };
        let (json, next_after) = match r.section.as_str() {
            "" => {
                let summary = serde_json::json!({
                    "counts": {
                        "members": state.members.len(),
                        "providers": state.providers.len(),
                        "tiers": state.tiers.len(),
                        "tenants": state.tenants.len(),
                        "api_keys": state.api_keys.len(),
                        "ledger": state.ledger.len(),
                        "breakers": state.breakers.len(),
                        "usage_days": state.usage.len(),
                        "alerts": state.alerts.len(),
                        "applied_seq": state.applied_seq.len(),
                    },
                    "members": state.members,
                    "tiers": state.tiers,
                    "providers": shown_providers(),
                    "breakers": state.breakers,
                });
                (summary.to_string(), String::new())
            }
            "members" => page(page_of(&state.members, &r.prefix, &r.after, limit)?)?,
            "providers" => page(page_of(&shown_providers(), &r.prefix, &r.after, limit)?)?,
            "tiers" => page(page_of(&state.tiers, &r.prefix, &r.after, limit)?)?,
            "tenants" => page(page_of(&state.tenants, &r.prefix, &r.after, limit)?)?,
            "api_keys" => page(page_of(&state.api_keys, &r.prefix, &r.after, limit)?)?,
            "ledger" => page(ledger_page(&state.ledger, &r.prefix, &r.after, limit)?)?,
            "breakers" => page(page_of(&state.breakers, &r.prefix, &r.after, limit)?)?,
            "usage" => page(page_of(&state.usage, &r.prefix, &r.after, limit)?)?,
            "alerts" => page(page_of(&state.alerts, &r.prefix, &r.after, limit)?)?,
            "revoked_certs" => page(page_of(&state.revoked_certs, &r.prefix, &r.after, limit)?)?,
            "applied_seq" => page(page_of(&state.applied_seq, &r.prefix, &r.after, limit)?)?,
            other => {
                return Err(field(
                    "section",
                    &format!(
                        "{other:?} is not one of members, providers, tiers, tenants, api_keys, ledger, breakers, usage, alerts, revoked_certs, applied_seq"
                    ),
                ));
            }
        };
        Ok(Response::new(pb::ClusterStateResponse {
            applied_index: self.cluster.status().applied_index,
            json,
            next_after,
        }))
    }

    async fn mesh_status(
        &self,
        _req: Request<pb::MeshStatusRequest>,
    ) -> Result<Response<pb::MeshStatusResponse>, Status> {
        let Some(mesh) = &self.mesh else {
            return Ok(Response::new(pb::MeshStatusResponse::default()));
        };
        let mut connected = mesh.connected().await;
        connected.sort();
        let mut peers = Vec::new();
        let mut errors = Vec::new();
        for answer in mesh.describe_peers(Duration::from_secs(2)).await {
            match answer {
                Ok(d) => peers.push(pb::MeshPeer {
                    node_id: d.node_id,
                    region: d.region,
                    providers: d
                        .providers
                        .into_iter()
                        .map(|p| pb::MeshProvider {
                            id: p.id,
                            models: p.models,
                            in_flight: p.in_flight,
                            queued: p.queued,
                        })
                        .collect(),
                }),
                Err(e) => errors.push(e.to_string()),
            }
        }
        peers.sort_by_key(|p| p.node_id);
        Ok(Response::new(pb::MeshStatusResponse {
            enabled: true,
            connected,
            peers,
            errors,
        }))
    }

    async fn add_learner(
        &self,
        req: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let r = req.into_inner();
        if r.node_id == 0 {
            return Err(field("node_id", "must be a positive integer"));
        }
        if r.raft_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(field(
                "raft_addr",
                &format!("{:?} is not HOST:PORT (e.g. 10.0.0.4:7000)", r.raft_addr),
            ));
        }
        changed(
            self.cluster.add_learner(r.node_id, r.raft_addr).await,
            || format!("node {}", r.node_id),
        )
    }

    async fn promote_voter(
        &self,
        req: Request<pb::PromoteVoterRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let id = req.into_inner().node_id;
        changed(self.cluster.promote(id).await, || {
            format!("node {id} (add it as a learner first)")
        })
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let id = req.into_inner().node_id;
        changed(self.cluster.remove(id).await, || format!("node {id}"))
    }

    async fn revoke_certificate(
        &self,
        req: Request<pb::RevokeCertificateRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let r = req.into_inner();
        let fingerprint = r.fingerprint_sha256.to_ascii_lowercase();
        if fingerprint.len() != 64 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(field(
                "fingerprint_sha256",
                "must be the 64 hex digits of a SHA-256",
            ));
        }
        changed(
            self.cluster
                .propose(Command::RevokeCertificate {
                    fingerprint: fingerprint.clone(),
                    node: r.node_id,
                })
                .await,
            || format!("certificate {fingerprint}"),
        )
    }

    async fn put_tier(
        &self,
        req: Request<pb::PutTierRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let tier = req
            .into_inner()
            .tier
            .ok_or_else(|| field("tier", "is required"))?;
        if let Some(why) = invalid_name(&tier.name) {
            return Err(field("tier.name", &why));
        }
        let tier = Tier {
            name: tier.name,
            limits: tier.limits.unwrap_or_default().into(),
            per_user: tier.per_user.unwrap_or_default().into(),
        };
        let before = self.cluster.state().borrow().tiers.get(&tier.name).cloned();
        let outcome = self
            .cluster
            .propose(Command::UpsertTier(tier.clone()))
            .await;
        with_changes(changed(outcome, String::new)?, before.as_ref(), &tier, &[])
    }

    async fn put_tenant(
        &self,
        req: Request<pb::PutTenantRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let t = req
            .into_inner()
            .tenant
            .ok_or_else(|| field("tenant", "is required"))?;
        if let Some(why) = invalid_name(&t.id) {
            return Err(field("tenant.id", &why));
        }
        for name in t.features.keys() {
            if let Some(why) = invalid_name(name) {
                return Err(field("tenant.features", &format!("feature {why}")));
            }
        }
        let tier = t.tier.clone();
        let tenant = Tenant {
            id: t.id,
            tier: t.tier,
            overrides: t.overrides.unwrap_or_default().into(),
            per_user: t.per_user.unwrap_or_default().into(),
            features: t.features.into_iter().map(|(k, v)| (k, v.into())).collect(),
            regions: t.regions,
            models: t.models,
            // 0 and 1 are the same weight: stored as 1 so that neither reads as a change.
            weight: t.weight.max(1),
            created_at_unix_ms: 0,
            updated_at_unix_ms: 0,
            engine_fields: t.engine_fields,
        };
        let before = self
            .cluster
            .state()
            .borrow()
            .tenants
            .get(&tenant.id)
            .cloned();
        let outcome = self
            .cluster
            .propose(Command::UpsertTenant(tenant.clone()))
            .await;
        with_changes(
            changed(outcome, || format!("tier {tier:?}"))?,
            before.as_ref(),
            &tenant,
            &["created_at_unix_ms", "updated_at_unix_ms"],
        )
    }

    async fn create_api_key(
        &self,
        req: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let r = req.into_inner();
        if let Some(why) = invalid_name(&r.tenant) {
            return Err(field("tenant", &why));
        }
        if r.label.len() > 200 {
            return Err(field("label", "must be at most 200 bytes"));
        }
        let key =
            auth::generate_key().map_err(|e| Status::internal(format!("no OS randomness: {e}")))?;
        let record = ApiKeyRecord {
            id: key.id.clone(),
            tenant: r.tenant.clone(),
            sha256_hex: key.sha256_hex.clone(),
            label: r.label,
            created_at_unix_ms: 0,
            revoked_at_unix_ms: None,
        };
        let outcome = self.cluster.propose(Command::CreateApiKey(record)).await;
        let answer = changed(outcome, || format!("tenant {:?}", r.tenant)).map_err(|s| {
            if s.code() != tonic::Code::Unavailable {
                return s;
            }
            // The write may still commit (a leader without quorum keeps it in its log): a key
            // whose secret nobody was shown. Its id lets the operator find and revoke it.
            Status::with_metadata(
                s.code(),
                format!(
                    "{}; key {id} may still be created once the cluster recovers, with its \
                     secret unseen: if `meridian admin key list` shows it, revoke it \
                     (`meridian admin key revoke {id}`)",
                    s.message(),
                    id = key.id
                ),
                s.metadata().clone(),
            )
        })?;
        match answer.into_inner() {
            pb::ChangeResponse { changed: true, .. } => {
                Ok(Response::new(pb::CreateApiKeyResponse {
                    key_id: key.id.clone(),
                    secret: key.secret.clone(),
                }))
            }
            // 48 random bits collided with an existing id: vanishingly rare, and safe to retry.
            pb::ChangeResponse { changed: false, .. } => Err(Status::aborted(
                "the new key's id is already taken; create it again",
            )),
        }
    }

    async fn list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let r = req.into_inner();
        let state = Arc::clone(&self.cluster.state().borrow());
        let limit = page_limit(r.limit);
        let mut keys: Vec<pb::ApiKeyInfo> = after_key(&state.api_keys, &r.after)
            .map(|(_, k)| k)
            .filter(|k| r.tenant.is_empty() || k.tenant == r.tenant)
            .take(limit + 1)
            .map(|k| pb::ApiKeyInfo {
                key_id: k.id.clone(),
                tenant: k.tenant.clone(),
                label: k.label.clone(),
                created_at_unix_ms: k.created_at_unix_ms,
                revoked_at_unix_ms: k.revoked_at_unix_ms,
            })
            .collect();
        let next_after = next_page(&mut keys, limit, |k| k.key_id.clone());
        Ok(Response::new(pb::ListApiKeysResponse { keys, next_after }))
    }

    async fn revoke_api_key(
        &self,
        req: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let id = req.into_inner().key_id;
        changed(
            self.cluster
                .propose(Command::RevokeApiKey { id: id.clone() })
                .await,
            || format!("key {id:?}"),
        )
    }

    async fn list_breakers(
        &self,
        _req: Request<pb::ListBreakersRequest>,
    ) -> Result<Response<pb::ListBreakersResponse>, Status> {
        let state = self.cluster.state().borrow().clone();
        // The node's clock, the one breakers were opened by.
        let now = self.cluster.now_ms();
        let breakers = state
            .breakers
            .iter()
            .map(|(provider, r)| {
                use pb::BreakerPosition as P;
                let (position, until) = match r.state {
                    BreakerState::Closed => (P::Closed, None),
                    BreakerState::Open { until_unix_ms } if r.forced || now < until_unix_ms => {
                        (P::Open, Some(until_unix_ms))
                    }
                    BreakerState::Open { until_unix_ms } => (P::HalfOpen, Some(until_unix_ms)),
                };
                pb::Breaker {
                    provider: provider.clone(),
                    state: match position {
                        P::Closed => "closed",
                        P::Open => "open",
                        P::HalfOpen => "half_open",
                        P::Unspecified => "unspecified",
                    }
                    .into(),
                    position: position as i32,
                    open_until_unix_ms: until,
                    reason: r.reason.clone(),
                    trips: r.trips,
                    forced: r.forced,
                    since_unix_ms: r.since_unix_ms,
                    by_node: r.by,
                }
            })
            .collect();
        Ok(Response::new(pb::ListBreakersResponse { breakers }))
    }

    async fn list_replicas(
        &self,
        _req: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        let replicas = self
            .vllm
            .list()
            .into_iter()
            .map(|r| pb::Replica {
                name: r.name,
                group: r.group,
                provider_id: r.provider_id,
                state: r.state.as_str().into(),
                life: life(r.state) as i32,
                state_for_ms: r.state_for.as_millis() as u64,
                uptime_ms: r.uptime.map_or(0, |u| u.as_millis() as u64),
                pid: r.pid.unwrap_or(0),
                port: u32::from(r.port),
                gpus: r.gpus,
                restarts: r.restarts,
                in_flight: r.in_flight,
                running: r.running,
                waiting: r.waiting,
                kv_cache_usage: r.kv_cache_usage,
                prefix_cache_hit_rate: r.prefix_cache_hit_rate,
                last_exit: r.last_exit.unwrap_or_default(),
                models: r.models,
            })
            .collect();
        Ok(Response::new(pb::ListReplicasResponse { replicas }))
    }

    async fn control_replica(
        &self,
        req: Request<pb::ControlReplicaRequest>,
    ) -> Result<Response<pb::ControlReplicaResponse>, Status> {
        use meridian_actors::vllm::actor::Control;
        let req = req.into_inner();
        if req.replica.is_empty() {
            return Err(field("replica", "is required"));
        }
        let control = match pb::ReplicaAction::try_from(req.action) {
            Ok(pb::ReplicaAction::Drain) => Control::Drain,
            Ok(pb::ReplicaAction::Stop) => Control::Stop,
            Ok(pb::ReplicaAction::Start) => Control::Start,
            Ok(pb::ReplicaAction::Restart) => Control::Restart,
            _ => {
                return Err(field(
                    "action",
                    "must be REPLICA_ACTION_DRAIN, _STOP, _START or _RESTART",
                ));
            }
        };
        replica_answer(self.vllm.control(&req.replica, control).await)
    }

    async fn reload_config(
        &self,
        _req: Request<pb::ReloadConfigRequest>,
    ) -> Result<Response<pb::ReloadConfigResponse>, Status> {
        use crate::reload::ReloadError;
        let Some(reloader) = &self.reloader else {
            return Err(Status::failed_precondition(ReloadError::NoFile.to_string()));
        };
        match reloader.reload().await {
            Ok(r) => {
                tracing::info!(%r, "configuration reloaded (admin API)");
                Ok(Response::new(r.into()))
            }
            Err(e @ (ReloadError::Invalid(_) | ReloadError::Read { .. })) => {
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e @ ReloadError::NoFile) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ ReloadError::Apply(_)) => Err(Status::internal(e.to_string())),
        }
    }

    async fn list_calls(
        &self,
        req: Request<pb::ListCallsRequest>,
    ) -> Result<Response<pb::ListCallsResponse>, Status> {
        usage::list_calls(self.calls.clone(), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn usage_report(
        &self,
        req: Request<pb::UsageReportRequest>,
    ) -> Result<Response<pb::UsageReportResponse>, Status> {
        (usage::report(&self.cluster, req.into_inner()).await).map(Response::new)
    }

    async fn lora_adapter(
        &self,
        req: Request<pb::LoraAdapterRequest>,
    ) -> Result<Response<pb::ControlReplicaResponse>, Status> {
        let req = req.into_inner();
        if req.replica.is_empty() {
            return Err(field("replica", "is required"));
        }
        if req.name.is_empty() {
            return Err(field("name", "is required"));
        }
        let path = (!req.path.is_empty()).then_some(req.path.as_str());
        replica_answer(self.vllm.lora(&req.replica, &req.name, path).await)
    }

    async fn set_breaker(
        &self,
        req: Request<pb::SetBreakerRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let req = req.into_inner();
        if req.provider.is_empty() {
            return Err(field("provider", "is required"));
        }
        let reason = |default: &str| {
            if req.reason.is_empty() {
                default.to_owned()
            } else {
                req.reason.clone()
            }
        };
        let (state, forced, reason) = match pb::BreakerAction::try_from(req.action) {
            Ok(pb::BreakerAction::ForceOpen) => (
                BreakerState::Open {
                    until_unix_ms: u64::MAX,
                },
                true,
                reason("forced open by an operator"),
            ),
            Ok(pb::BreakerAction::ForceClosed) => (
                BreakerState::Closed,
                true,
                reason("forced closed by an operator"),
            ),
            Ok(pb::BreakerAction::Reset) => {
                (BreakerState::Closed, false, reason("reset by an operator"))
            }
            _ => {
                return Err(field(
                    "action",
                    "must be BREAKER_ACTION_FORCE_OPEN, BREAKER_ACTION_FORCE_CLOSED or BREAKER_ACTION_RESET",
                ));
            }
        };
        let provider = req.provider.clone();
        changed(
            self.cluster
                .propose(Command::SetBreaker {
                    provider: req.provider,
                    state,
                    reason,
                    trips: 0,
                    forced,
                    expect_version: None,
                    groups: Vec::new(),
                })
                .await,
            || format!("breaker {provider:?}"),
        )
    }

    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let r = req.into_inner();
        let state = Arc::clone(&self.cluster.state().borrow());
        let limit = page_limit(r.limit);
        let mut tenants: Vec<pb::Tenant> = after_key(&state.tenants, &r.after)
            .take(limit + 1)
            .map(|(_, t)| t.into())
            .collect();
        let next_after = next_page(&mut tenants, limit, |t| t.id.clone());
        Ok(Response::new(pb::ListTenantsResponse {
            tiers: if r.after.is_empty() {
                state.tiers.values().map(Into::into).collect()
            } else {
                Vec::new()
            },
            tenants,
            applied_index: self.cluster.status().applied_index,
            next_after,
        }))
    }
}

/// INVALID_ARGUMENT naming the field, the way the inference API does.
fn field(name: &str, problem: &str) -> Status {
    let mut s = Status::invalid_argument(format!("{name} {problem}"));
    if let Ok(v) = name.parse() {
        s.metadata_mut().insert("x-meridian-error-param", v);
    }
    s
}

/// A replicated write's outcome as an admin answer; `missing` names what was not found.
fn changed(
    outcome: Result<Applied, ClusterError>,
    missing: impl FnOnce() -> String,
) -> Result<Response<pb::ChangeResponse>, Status> {
    match outcome {
        Ok(Applied::Changed | Applied::Granted { .. }) => Ok(Response::new(pb::ChangeResponse {
            changed: true,
            changes: Vec::new(),
        })),
        Ok(Applied::Unchanged | Applied::Refused) => Ok(Response::new(pb::ChangeResponse {
            changed: false,
            changes: Vec::new(),
        })),
        Ok(Applied::NotFound) => Err(Status::not_found(format!("{} does not exist", missing()))),
        Ok(other @ Applied::ReadIndex { .. }) => Err(Status::internal(format!(
            "a write was answered {other:?}, which is no write's outcome"
        ))),
        Err(
            e @ (ClusterError::NoLeader
            | ClusterError::Unreached(_)
            | ClusterError::NotLeader { .. }
            | ClusterError::Behind { .. }
            | ClusterError::NoReadIndex(_)
            | ClusterError::NoQuorum(_)),
        ) => {
            let mut s = Status::unavailable(e.to_string());
            s.metadata_mut().insert(
                "retry-after",
                tonic::metadata::MetadataValue::from_static("1"),
            );
            Err(s)
        }
        Err(e @ ClusterError::Rejected(_)) => Err(Status::failed_precondition(e.to_string())),
        Err(e @ ClusterError::Fatal(_)) => Err(Status::internal(e.to_string())),
    }
}

/// An upsert's answer with what it changed: `after` against `before`, the record as this node
/// had applied it when the write was proposed (`skip`: fields apply sets itself).
fn with_changes<T: serde::Serialize>(
    mut answer: Response<pb::ChangeResponse>,
    before: Option<&T>,
    after: &T,
    skip: &[&str],
) -> Result<Response<pb::ChangeResponse>, Status> {
    if answer.get_ref().changed {
        answer.get_mut().changes = changed_fields(before, after, skip);
    }
    Ok(answer)
}

/// A replica's state as the admin API types it.
fn upstream_kind(kind: &ProviderKind) -> pb::UpstreamKind {
    match kind {
        ProviderKind::OpenAi => pb::UpstreamKind::Openai,
        ProviderKind::Anthropic => pb::UpstreamKind::Anthropic,
        ProviderKind::Demo => pb::UpstreamKind::Demo,
        ProviderKind::Mesh => pb::UpstreamKind::Mesh,
        ProviderKind::Vllm => pb::UpstreamKind::Vllm,
        ProviderKind::Other(_) => pb::UpstreamKind::Unspecified,
    }
}

fn life(state: ReplicaState) -> pb::ReplicaLife {
    use pb::ReplicaLife as L;
    match state {
        ReplicaState::Starting => L::Starting,
        ReplicaState::Ready => L::Ready,
        ReplicaState::Restarting => L::Restarting,
        ReplicaState::Backoff => L::Backoff,
        ReplicaState::Draining => L::Draining,
        ReplicaState::Stopping => L::Stopping,
        ReplicaState::Stopped => L::Stopped,
        ReplicaState::Failed => L::Failed,
    }
}

/// A replica command's outcome: what was done, or why not.
fn replica_answer(
    outcome: Result<String, ControlError>,
) -> Result<Response<pb::ControlReplicaResponse>, Status> {
    match outcome {
        Ok(message) => Ok(Response::new(pb::ControlReplicaResponse { message })),
        Err(e @ ControlError::NoSuchReplica { .. }) => Err(Status::not_found(e.to_string())),
        Err(e @ ControlError::Refused(_)) => Err(Status::failed_precondition(e.to_string())),
        Err(e @ ControlError::NoAnswer(_)) => Err(Status::unavailable(e.to_string())),
    }
}

mod pages;
mod usage;

#[cfg(test)]
mod tests;
