//! The routing specs of vLLM replicas: this node's own (see [`crate::vllm`]) and those other
//! nodes register in the cluster's provider registry.

use std::sync::Arc;
use std::time::Duration;

use meridian_proto::cluster::{ProviderPrice, ProviderRecord, Reach};

use super::{ModelRoute, ProviderSpec};
use crate::mesh::caller::MeshUpstream;
use crate::upstream::{ApiAdapter, Dialect, EndpointError, Timeouts, Upstream};

/// Connecting to a replica (on this node or a nearby one) takes no longer than this.
pub(crate) const REPLICA_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How any node routes to a vLLM replica (through `upstream`: the OpenAI dialect at its address,
/// or its owner on the actor mesh): prefix affinity on (vLLM caches prefixes), queueing with the
/// defaults.
pub fn replica_spec(
    id: String,
    region: String,
    upstream: Upstream,
    models: Vec<ModelRoute>,
    max_concurrency: u32,
    weight: u32,
) -> ProviderSpec {
    let timeouts = Timeouts {
        connect: REPLICA_CONNECT_TIMEOUT,
        ..Timeouts::default()
    };
    let max_concurrency = max_concurrency.max(1);
    ProviderSpec {
        id,
        region,
        models,
        upstream,
        max_concurrency,
        queue_capacity: max_concurrency.saturating_mul(2),
        queue_timeout: Duration::from_secs(30),
        timeouts,
        tokenizer: crate::estimate::Tokenizer::default(),
        default_max_tokens: crate::estimate::DEFAULT_COMPLETION_RESERVE as u32,
        prefix_affinity: true,
        weight: weight.max(1),
        price: ProviderPrice::default(),
    }
}

/// The routing spec of a replica another node registered: called directly at its address, or
/// through its owner on the actor mesh when the record says it is reached through it.
pub fn remote_replica_spec(record: &ProviderRecord) -> Result<ProviderSpec, EndpointError> {
    let models = record
        .models
        .iter()
        .map(|m| ModelRoute {
            name: m.clone(),
            upstream_name: m.clone(),
        })
        .collect();
    let upstream = match &record.reach {
        Reach::Through(node) => {
            Upstream::Relayed(Arc::new(MeshUpstream::new(*node, record.id.clone())))
        }
        Reach::Direct(url) => Upstream::Api(ApiAdapter::new(
            Dialect::Vllm,
            url,
            (!record.api_key.is_empty()).then(|| record.api_key.clone()),
            REPLICA_CONNECT_TIMEOUT,
        )?),
    };
    let mut spec = replica_spec(
        record.id.clone(),
        record.region.clone(),
        upstream,
        models,
        if record.max_concurrency == 0 {
            256
        } else {
            record.max_concurrency
        },
        record.weight,
    );
    if record.default_max_tokens > 0 {
        spec.default_max_tokens = record.default_max_tokens;
    }
    Ok(spec)
}
