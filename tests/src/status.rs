//! What a [`TestNode`] reports of its providers and of its vLLM replicas.

use meridian_actors::ProviderStatus;
use meridian_actors::vllm::ReplicaStatus;

use crate::TestNode;

impl TestNode {
    /// Provider `id` as the node's gateway reports it.
    pub fn provider(&self, id: &str) -> Option<ProviderStatus> {
        self.gateway.providers().into_iter().find(|p| p.id == id)
    }

    /// Replica `name` (`<group>-<index>`) as the node's vLLM supervisor reports it.
    pub fn replica(&self, name: &str) -> Option<ReplicaStatus> {
        self.vllm.list().into_iter().find(|r| r.name == name)
    }
}
