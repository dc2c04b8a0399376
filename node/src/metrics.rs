//! `GET /metrics`: Prometheus text exposition (format 0.0.4) of the node's cluster health and
//! its providers' load. Rendered on request from the live counters; nothing is kept here.

use std::fmt::Write;

use meridian_actors::Gateway;
use meridian_actors::vllm::ReplicaState;
use meridian_actors::vllm::supervisor::Vllm;
use meridian_cluster::raft::ClusterNode;

/// The exposition text.
pub fn render(gateway: &Gateway, cluster: &ClusterNode, vllm: &Vllm) -> String {
    let mut out = String::with_capacity(4096);
    let c = cluster.status();
    let members = cluster.state().borrow().members.len();
    let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    gauge(
        &mut out,
        "meridian_cluster_quorum",
        "1 while this node is in touch with a quorum; 0: serving from its last applied state",
        u64::from(c.quorum),
    );
    gauge(
        &mut out,
        "meridian_cluster_is_leader",
        "1 on the Raft leader",
        u64::from(c.leader == Some(c.id)),
    );
    gauge(
        &mut out,
        "meridian_cluster_leader_id",
        "The leader's node id as this node knows it (0: none known)",
        c.leader.unwrap_or(0),
    );
    gauge(
        &mut out,
        "meridian_cluster_term",
        "The current Raft term",
        c.term,
    );
    for (name, help, value) in [
        (
            "meridian_cluster_last_log_index",
            "Last entry in this node's log",
            c.last_log_index,
        ),
        (
            "meridian_cluster_commit_index",
            "Committed, as this node knows it",
            c.commit_index,
        ),
        (
            "meridian_cluster_applied_index",
            "Applied to the replicated state",
            c.applied_index,
        ),
        (
            "meridian_cluster_snapshot_index",
            "Covered by the latest snapshot",
            c.snapshot_index,
        ),
    ] {
        gauge(&mut out, name, help, value.unwrap_or(0));
    }
    gauge(
        &mut out,
        "meridian_cluster_voters",
        "Voters in the membership",
        c.voters.len() as u64,
    );
    gauge(
        &mut out,
        "meridian_cluster_learners",
        "Learners in the membership",
        c.learners.len() as u64,
    );
    gauge(
        &mut out,
        "meridian_cluster_members",
        "Nodes in the replicated member table",
        members as u64,
    );

    let providers = gateway.providers();
    let family =
        |out: &mut String, name: &str, kind: &str, help: &str, values: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (id, v) in values {
                let _ = writeln!(out, "{name}{{provider=\"{}\"}} {v}", escape(id));
            }
        };
    let per = |f: &dyn Fn(&meridian_actors::ProviderStatus) -> u64| -> Vec<(String, u64)> {
        providers.iter().map(|p| (p.id.clone(), f(p))).collect()
    };
    family(
        &mut out,
        "meridian_provider_in_flight",
        "gauge",
        "Requests being served",
        &per(&|p| u64::from(p.in_flight)),
    );
    family(
        &mut out,
        "meridian_provider_queued",
        "gauge",
        "Requests waiting for a slot",
        &per(&|p| u64::from(p.queued)),
    );
    family(
        &mut out,
        "meridian_provider_requests_total",
        "counter",
        "Requests handed to the provider",
        &per(&|p| p.requests_total),
    );
    family(
        &mut out,
        "meridian_provider_failures_total",
        "counter",
        "Requests that failed upstream",
        &per(&|p| p.failures_total),
    );
    family(
        &mut out,
        "meridian_provider_restarts_total",
        "counter",
        "Supervisor restarts of the provider's actor",
        &per(&|p| p.restarts),
    );
    if let Some(q) = gateway.quota() {
        let (local_share, denied) = q.no_quorum_counts();
        let _ = writeln!(
            out,
            "# HELP meridian_quota_local_share_admissions_total Admissions under a local share of a limit (no quorum)\n\
             # TYPE meridian_quota_local_share_admissions_total counter\n\
             meridian_quota_local_share_admissions_total {local_share}\n\
             # HELP meridian_quota_no_quorum_denials_total Requests refused because no quota slice could be had (no quorum)\n\
             # TYPE meridian_quota_no_quorum_denials_total counter\n\
             meridian_quota_no_quorum_denials_total {denied}"
        );
    }
    {
        use meridian_actors::mesh::caller::forwarded_total;
        use meridian_actors::mesh::forward::served_total;
        let _ = writeln!(
            out,
            "# HELP meridian_mesh_calls_total Calls forwarded through the actor mesh: sent to the node that reaches the provider, or served here for another node\n\
             # TYPE meridian_mesh_calls_total counter\n\
             meridian_mesh_calls_total{{direction=\"sent\"}} {}\n\
             meridian_mesh_calls_total{{direction=\"served\"}} {}",
            forwarded_total(),
            served_total(),
        );
    }
    if let Some((hits, misses)) = gateway.cache_counts() {
        let _ = writeln!(
            out,
            "# HELP meridian_cache_lookups_total Response cache lookups, by result\n\
             # TYPE meridian_cache_lookups_total counter\n\
             meridian_cache_lookups_total{{result=\"hit\"}} {hits}\n\
             meridian_cache_lookups_total{{result=\"miss\"}} {misses}"
        );
    }
    {
        let b = gateway.breaker_stats();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP meridian_breaker_proposals_total Breaker changes this node proposed, by kind\n\
             # TYPE meridian_breaker_proposals_total counter\n\
             meridian_breaker_proposals_total{{kind=\"trip\"}} {}\n\
             meridian_breaker_proposals_total{{kind=\"close\"}} {}\n\
             # HELP meridian_breaker_panic_refusals_total Trips refused because half of a model's providers were already ejected\n\
             # TYPE meridian_breaker_panic_refusals_total counter\n\
             meridian_breaker_panic_refusals_total {}",
            load(&b.trips_proposed),
            load(&b.closes_proposed),
            load(&b.trips_refused_panic),
        );
        let state = cluster.state().borrow().clone();
        let _ = writeln!(
            out,
            "# HELP meridian_breaker_open 1 while the provider's breaker is open (or half-open), cluster-wide\n\
             # TYPE meridian_breaker_open gauge"
        );
        for (provider, r) in &state.breakers {
            let _ = writeln!(
                out,
                "meridian_breaker_open{{provider=\"{}\"}} {}",
                escape(provider),
                u64::from(r.is_open())
            );
        }
    }
    render_vllm(&mut out, vllm);
    gauge(
        &mut out,
        "meridian_draining",
        "1 once shutdown has begun",
        u64::from(gateway.is_draining()),
    );
    out
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// This node's vLLM replicas: state, restarts, engine load; crashes and scale decisions.
fn render_vllm(out: &mut String, vllm: &Vllm) {
    let replicas = vllm.list();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let st = vllm.stats();
    let _ = writeln!(
        out,
        "# HELP meridian_vllm_crashes_total Replica processes that exited, hung or failed health checks unasked\n\
         # TYPE meridian_vllm_crashes_total counter\n\
         meridian_vllm_crashes_total {}\n\
         # HELP meridian_vllm_scale_events_total Autoscaler decisions (blocked: wanted to scale up, no free GPU or port)\n\
         # TYPE meridian_vllm_scale_events_total counter\n\
         meridian_vllm_scale_events_total{{direction=\"up\"}} {}\n\
         meridian_vllm_scale_events_total{{direction=\"down\"}} {}\n\
         meridian_vllm_scale_events_total{{direction=\"blocked\"}} {}",
        load(&st.crashes),
        load(&st.scale_ups),
        load(&st.scale_downs),
        load(&st.scale_blocked),
    );
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&meridian_actors::vllm::ReplicaStatus) -> f64,
    );
    let series: [Series; 6] = [
        (
            "meridian_vllm_replica_ready",
            "gauge",
            "1 while the replica is ready and routable",
            |r| f64::from(u8::from(r.state == ReplicaState::Ready)),
        ),
        (
            "meridian_vllm_replica_failed",
            "gauge",
            "ALERT: 1 once the replica crashed too often and is no longer restarted",
            |r| f64::from(u8::from(r.state == ReplicaState::Failed)),
        ),
        (
            "meridian_vllm_replica_restarts_total",
            "counter",
            "Restarts after crashes",
            |r| r.restarts as f64,
        ),
        (
            "meridian_vllm_replica_running",
            "gauge",
            "Requests running in the engine (its /metrics)",
            |r| f64::from(r.running),
        ),
        (
            "meridian_vllm_replica_waiting",
            "gauge",
            "Requests waiting in the engine (its /metrics)",
            |r| f64::from(r.waiting),
        ),
        (
            "meridian_vllm_replica_kv_cache_usage",
            "gauge",
            "KV-cache use, 0-1 (its /metrics)",
            |r| r.kv_cache_usage,
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for r in &replicas {
            let _ = writeln!(
                out,
                "{name}{{replica=\"{}\",group=\"{}\"}} {}",
                escape(&r.name),
                escape(&r.group),
                value(r)
            );
        }
    }
}
