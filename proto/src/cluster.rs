//! The replicated state: commands that go through the Raft log and the state they build.
//!
//! Applying is deterministic: a [`Proposal`] carries its proposer's timestamp, and
//! [`ClusterState::apply`] reads no clock, does no IO and draws no randomness, so every node
//! that applies the same log reaches the same state.
//!
//! Built so far: members and the provider registry. Tenants, tiers, API keys, the quota ledger,
//! breaker states and usage roll-ups are not built yet (the cluster, admission and routing
//! issues add them here).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's id in the cluster (Raft's node id).
pub type NodeId = u64;

/// One entry of the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Proposer's wall clock (Unix ms) when it proposed; the only time apply ever sees.
    pub at_unix_ms: u64,
    pub proposer: NodeId,
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    UpsertMember(Member),
    RemoveMember { id: NodeId },
    UpsertProvider(ProviderRecord),
    RemoveProvider { id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub region: String,
    /// Where peers reach this node's Raft endpoint.
    pub raft_addr: String,
    /// This node's client-facing HTTP address.
    pub http_addr: String,
}

/// A provider in the cluster-wide registry (e.g. a vLLM replica that became ready).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderRecord {
    pub id: String,
    pub kind: String,
    pub region: String,
    pub base_url: String,
    pub models: Vec<String>,
    /// The node that registered it.
    pub owner: NodeId,
    /// Set by apply from the proposal's timestamp.
    #[serde(default)]
    pub updated_at_unix_ms: u64,
}

/// What applying a proposal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Applied {
    /// The state changed.
    #[default]
    Changed,
    /// The command was valid but changed nothing (a repeat).
    Unchanged,
    /// It named something that does not exist.
    NotFound,
}

/// Everything the cluster agrees on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterState {
    pub members: BTreeMap<NodeId, Member>,
    pub providers: BTreeMap<String, ProviderRecord>,
}

impl ClusterState {
    pub fn apply(&mut self, p: &Proposal) -> Applied {
        match &p.command {
            Command::UpsertMember(m) => {
                if self.members.get(&m.id) == Some(m) {
                    return Applied::Unchanged;
                }
                self.members.insert(m.id, m.clone());
                Applied::Changed
            }
            Command::RemoveMember { id } => match self.members.remove(id) {
                Some(_) => Applied::Changed,
                None => Applied::NotFound,
            },
            Command::UpsertProvider(record) => {
                let mut record = record.clone();
                record.updated_at_unix_ms = p.at_unix_ms;
                if let Some(old) = self.providers.get(&record.id) {
                    let mut same = old.clone();
                    same.updated_at_unix_ms = record.updated_at_unix_ms;
                    if same == record {
                        return Applied::Unchanged;
                    }
                }
                self.providers.insert(record.id.clone(), record);
                Applied::Changed
            }
            Command::RemoveProvider { id } => match self.providers.remove(id) {
                Some(_) => Applied::Changed,
                None => Applied::NotFound,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposal(at: u64, command: Command) -> Proposal {
        Proposal {
            at_unix_ms: at,
            proposer: 1,
            command,
        }
    }

    fn provider(id: &str) -> ProviderRecord {
        ProviderRecord {
            id: id.into(),
            kind: "openai".into(),
            region: "eu".into(),
            base_url: "http://10.0.0.1:8000/v1".into(),
            models: vec!["llama".into()],
            owner: 1,
            updated_at_unix_ms: 0,
        }
    }

    #[test]
    fn apply_is_deterministic_and_idempotent_for_repeats() {
        let log = [
            proposal(10, Command::UpsertProvider(provider("a"))),
            proposal(20, Command::UpsertProvider(provider("a"))),
            proposal(
                30,
                Command::UpsertMember(Member {
                    id: 2,
                    region: "eu".into(),
                    raft_addr: "127.0.0.2:7000".into(),
                    http_addr: "127.0.0.2:8080".into(),
                }),
            ),
            proposal(40, Command::RemoveProvider { id: "zzz".into() }),
            proposal(50, Command::RemoveMember { id: 2 }),
        ];
        let run = || {
            let mut s = ClusterState::default();
            let outcomes: Vec<Applied> = log.iter().map(|p| s.apply(p)).collect();
            (s, outcomes)
        };
        let (a, outcomes) = run();
        assert_eq!(
            outcomes,
            [
                Applied::Changed,
                Applied::Unchanged,
                Applied::Changed,
                Applied::NotFound,
                Applied::Changed
            ]
        );
        assert_eq!(a, run().0, "the same log gives the same state");
        assert_eq!(
            a.providers["a"].updated_at_unix_ms, 10,
            "time comes from the proposal"
        );
        assert!(a.members.is_empty());
        let round_trip: ClusterState =
            serde_json::from_slice(&serde_json::to_vec(&a).expect("encode")).expect("decode");
        assert_eq!(round_trip, a);
    }
}
