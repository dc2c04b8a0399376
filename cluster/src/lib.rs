//! Meridian's replicated core.
//!
//! **Built so far** (part of the cluster issue): the Raft type configuration, a durable log
//! store on redb ([`store::LogStore`]), and the state machine over `meridian-proto`'s
//! replicated commands ([`state_machine::StateMachine`]), with snapshots persisted atomically.
//! Both pass openraft's own storage test suite.
//!
//! **Not built yet:** the QUIC (quinn, mTLS) transport, membership changes, the ractor_cluster
//! mesh, and the `ClusterHandle` the node will use to propose commands. Nodes do not run Raft
//! yet; until they do, every node is alone and knows only its configuration.
//!
//! This crate knows nothing of actors or HTTP.
#![allow(
    clippy::result_large_err,
    reason = "openraft's storage traits fix the error type (StorageError, ~224 bytes)"
)]

pub mod certs;
pub mod raft;
pub mod state_machine;
pub mod store;

use std::io::Cursor;

use meridian_proto::cluster::{Applied, NodeId, Proposal};

openraft::declare_raft_types!(
    /// Meridian's Raft types: proposals in, apply outcomes out.
    pub TypeConfig:
        D = Proposal,
        R = Applied,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Storage errors as openraft wants them.
pub type StorageError = openraft::StorageError<NodeId>;

pub(crate) fn io_error(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError {
    StorageError::from_io_error(subject, verb, std::io::Error::other(e.to_string()))
}
