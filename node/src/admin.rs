//! The admin gRPC service (its own port): node, providers, cluster. Bind it to an interface only
//! operators reach: admin authentication (token or mTLS) is not built yet.

use std::time::Instant;

use meridian_actors::Gateway;
use meridian_cluster::raft::ClusterNode;
use meridian_proto::pb::admin as pb;
use meridian_proto::pb::admin::admin_server::Admin;
use tonic::{Request, Response, Status};

pub struct AdminService {
    pub gateway: Gateway,
    pub cluster: ClusterNode,
    pub node_id: u64,
    pub region: String,
    pub started: Instant,
    pub http_addr: String,
    pub grpc_addr: String,
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
                kind: p.kind.into(),
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
        }))
    }
}
