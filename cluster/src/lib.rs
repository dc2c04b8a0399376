//! Meridian's replicated core — **not built yet**.
//!
//! This crate will own Raft (openraft) over QUIC (quinn, mutual TLS): the deterministic state
//! machine over `meridian-proto` commands, its durable log and snapshot store, membership, the
//! ractor_cluster actor mesh, and a `ClusterHandle` to propose commands plus a `watch` of the
//! applied snapshot. It knows nothing of actors or HTTP.
//!
//! Until the cluster issue lands it holds no logic: every node runs alone, and everything it
//! knows comes from its own configuration.
