//! `GET /metrics`: the node's metrics as OpenMetrics text, through prometheus-client.
//!
//! Two kinds of series: the request metrics the pipeline counts as requests end
//! ([`meridian_actors::metrics::Metrics`]), and live values read at each scrape (cluster health,
//! providers' load, quota, mesh, cache, breakers, vLLM replicas) by a collector that keeps
//! nothing itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use meridian_actors::Gateway;
use meridian_actors::vllm::ReplicaState;
use meridian_actors::vllm::supervisor::Vllm;
use meridian_cluster::raft::ClusterNode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::alerts::AlertCounts;
use crate::calls::SqliteCalls;
use crate::otlp::ExportCounts;

/// The content type of [`NodeMetrics::render`]'s text (OpenMetrics).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of [`NodeMetrics::render_prometheus`]'s text (Prometheus 0.0.4).
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything `/metrics` shows. Clones share it.
#[derive(Debug, Clone)]
pub struct NodeMetrics {
    registry: Arc<Registry>,
}

impl NodeMetrics {
    /// The node's metrics: `registry` with what the node's own parts registered (see
    /// [`Self::node_parts`]), the gateway's, and the live collector's.
    pub fn new(
        mut registry: Registry,
        gateway: Gateway,
        cluster: ClusterNode,
        vllm: Vllm,
        calls: Option<Arc<SqliteCalls>>,
        exports: Exports,
        alerts: Arc<AlertCounts>,
    ) -> Self {
        gateway.metrics().register(&mut registry);
        registry.register_collector(Box::new(Live {
            gateway,
            cluster,
            vllm,
            calls,
            exports,
            alerts,
        }));
        Self {
            registry: Arc::new(registry),
        }
    }

    /// A registry holding the metrics of the node's parts outside the gateway: the commit
    /// latency of its proposals and its HTTP connections.
    pub fn node_parts(
        commit_latency: Histogram,
        connections: &crate::conns::ConnLimits,
    ) -> Registry {
        let mut registry = Registry::default();
        registry.register_with_unit(
            "meridian_cluster_commit",
            "From this node's proposal (usage reports, grants, breaker changes, admin writes) to its being applied here",
            Unit::Seconds,
            commit_latency,
        );
        connections.register(&mut registry);
        registry
    }

    /// The exposition text, OpenMetrics (what Prometheus asks for first).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail; a collector's own error would end the text early.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics could not be encoded in full");
        }
        out
    }

    /// The same series as Prometheus' text format 0.0.4, for scrapers and tools that ask for no
    /// OpenMetrics (curl, `promtool check metrics`). prometheus-client writes OpenMetrics only;
    /// the two differ in three ways, undone here: a counter's family is named without its
    /// `_total` (0.0.4 names it with), and `# UNIT` and `# EOF` lines do not exist in 0.0.4.
    pub fn render_prometheus(&self) -> String {
        to_prometheus_text(&self.render())
    }
}

/// OpenMetrics text as Prometheus 0.0.4 text (see [`NodeMetrics::render_prometheus`]).
fn to_prometheus_text(open: &str) -> String {
    let mut out = String::with_capacity(open.len() + 1024);
    let mut help: Option<&str> = None;
    for line in open.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if line.starts_with("# HELP ") {
            // Held until the family's type says whether its name changes.
            if let Some(held) = help.replace(line) {
                out.push_str(held);
                out.push('\n');
            }
            continue;
        }
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|t| t.strip_suffix(" counter"))
        {
            if let Some(text) = help
                .take()
                .and_then(|h| h.strip_prefix(&format!("# HELP {name} ")))
            {
                out.push_str(&format!("# HELP {name}_total {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}_total counter\n"));
            continue;
        }
        if let Some(held) = help.take() {
            out.push_str(held);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The histogram of [`NodeMetrics::new`]'s `commit_latency`: 0.5 ms to about 4 s.
pub fn commit_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// Values read at each scrape.
struct Live {
    gateway: Gateway,
    cluster: ClusterNode,
    vllm: Vllm,
    calls: Option<Arc<SqliteCalls>>,
    exports: Exports,
    alerts: Arc<AlertCounts>,
}

/// What the OTLP exporters' batches came to (each `None` when it is not configured).
#[derive(Debug, Default)]
pub struct Exports {
    pub spans: Option<Arc<ExportCounts>>,
    pub call_records: Option<Arc<ExportCounts>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

type Fmt = Result<(), std::fmt::Error>;

/// One gauge without labels.
fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: i64) -> Fmt {
    ConstGauge::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// One series per label set: a gauge, or a counter (`name` without `_total`, which the
/// encoder appends).
fn family<'a, const N: usize, V>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = ([(&'static str, &'a str); N], V)>,
) -> Fmt
where
    V: EncodeCounterValue + EncodeGaugeValue + std::fmt::Debug,
{
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        let series = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(series)?,
            _ => ConstGauge::new(value).encode(series)?,
        }
    }
    Ok(())
}

/// One counter without labels.
fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> Fmt {
    ConstCounter::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

impl Collector for Live {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Fmt {
        self.cluster_health(&mut e)?;
        self.providers(&mut e)?;
        self.admission(&mut e)?;
        self.replicas(&mut e)?;
        if let Some(calls) = &self.calls {
            let st = calls.stats();
            family(
                &mut e,
                "meridian_call_records",
                "Per-call records: written to the node's call log, or dropped (queue full, or a write failed)",
                MetricType::Counter,
                [
                    ([("result", "written")], st.written.load(Ordering::Relaxed)),
                    ([("result", "dropped")], st.dropped.load(Ordering::Relaxed)),
                ],
            )?;
        }
        let exported = [
            (
                "meridian_trace_spans",
                "Spans for the trace collector: exported, failed (in a batch the collector did not take), or dropped (the queue was full)",
                &self.exports.spans,
            ),
            (
                "meridian_call_records_exported",
                "Per-call records sent to the OTLP collector as log records: exported, or failed (in a batch the collector did not take)",
                &self.exports.call_records,
            ),
        ];
        for (name, help, counts) in exported {
            if let Some(c) = counts {
                family(
                    &mut e,
                    name,
                    help,
                    MetricType::Counter,
                    [
                        ([("result", "exported")], c.exported.load(Ordering::Relaxed)),
                        ([("result", "failed")], c.failed.load(Ordering::Relaxed)),
                        ([("result", "dropped")], c.dropped.load(Ordering::Relaxed)),
                    ],
                )?;
            }
        }
        let alerts = &self.alerts;
        family(
            &mut e,
            "meridian_spend_alerts",
            "Spend alerts this node fired (recorded for the cluster), delivered to the webhook, or failed to deliver after every retry",
            MetricType::Counter,
            [
                ([("result", "fired")], alerts.fired.load(Ordering::Relaxed)),
                (
                    [("result", "delivered")],
                    alerts.delivered.load(Ordering::Relaxed),
                ),
                (
                    [("result", "failed")],
                    alerts.failed.load(Ordering::Relaxed),
                ),
            ],
        )?;
        gauge(
            &mut e,
            "meridian_draining",
            "1 once shutdown has begun",
            i64::from(self.gateway.is_draining()),
        )
    }
}

impl Live {
    fn cluster_health(&self, e: &mut DescriptorEncoder<'_>) -> Fmt {
        let c = self.cluster.status();
        let members = self.cluster.state().borrow().members.len();
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (name, help, value) in [
            (
                "meridian_cluster_quorum",
                "1 while this node is in touch with a quorum; 0: serving from its last applied state",
                i64::from(c.quorum),
            ),
            (
                "meridian_cluster_is_leader",
                "1 on the Raft leader",
                i64::from(c.leader == Some(c.id)),
            ),
            (
                "meridian_cluster_leader_id",
                "The leader's node id as this node knows it (0: none known)",
                n(c.leader.unwrap_or(0)),
            ),
            ("meridian_cluster_term", "The current Raft term", n(c.term)),
            (
                "meridian_cluster_last_log_index",
                "Last entry in this node's log",
                n(c.last_log_index.unwrap_or(0)),
            ),
            (
                "meridian_cluster_commit_index",
                "Committed, as this node knows it",
                n(c.commit_index.unwrap_or(0)),
            ),
            (
                "meridian_cluster_applied_index",
                "Applied to the replicated state",
                n(c.applied_index.unwrap_or(0)),
            ),
            (
                "meridian_cluster_apply_lag",
                "Committed entries not yet applied here",
                n(c.commit_index
                    .unwrap_or(0)
                    .saturating_sub(c.applied_index.unwrap_or(0))),
            ),
            (
                "meridian_cluster_snapshot_index",
                "Covered by the latest snapshot",
                n(c.snapshot_index.unwrap_or(0)),
            ),
            (
                "meridian_cluster_voters",
                "Voters in the membership",
                c.voters.len() as i64,
            ),
            (
                "meridian_cluster_learners",
                "Learners in the membership",
                c.learners.len() as i64,
            ),
            (
                "meridian_cluster_members",
                "Nodes in the replicated member table",
                members as i64,
            ),
        ] {
            gauge(e, name, help, value)?;
        }
        let spares = self.cluster.spares();
        family(
            e,
            "meridian_cluster_state_applies",
            "Applies of the replicated state by what became of the version each replaced: reused (the next apply changes it in place), held (a reader still held it: the next apply copies what it changes), joined (the two copies joined again, every 10 minutes and after a bulk write)",
            MetricType::Counter,
            [
                ([("spare", "reused")], spares.reused.load(Ordering::Relaxed)),
                ([("spare", "held")], spares.held.load(Ordering::Relaxed)),
                ([("spare", "joined")], spares.joined.load(Ordering::Relaxed)),
            ],
        )?;
        Ok(())
    }

    fn providers(&self, e: &mut DescriptorEncoder<'_>) -> Fmt {
        let providers = self.gateway.providers();
        type Column = fn(&meridian_actors::ProviderStatus) -> u64;
        let columns: [(&str, &str, MetricType, Column); 6] = [
            (
                "meridian_provider_in_flight",
                "Requests being served",
                MetricType::Gauge,
                |p| u64::from(p.in_flight),
            ),
            (
                "meridian_provider_queued",
                "Requests waiting for a slot",
                MetricType::Gauge,
                |p| u64::from(p.queued),
            ),
            (
                "meridian_provider_requests",
                "Requests handed to the provider",
                MetricType::Counter,
                |p| p.requests_total,
            ),
            (
                "meridian_provider_failures",
                "Requests that failed upstream",
                MetricType::Counter,
                |p| p.failures_total,
            ),
            (
                "meridian_provider_restarts",
                "Supervisor restarts of the provider's actor",
                MetricType::Counter,
                |p| p.restarts,
            ),
            (
                "meridian_provider_queue_capacity",
                "Requests the provider's queue holds at most",
                MetricType::Gauge,
                |p| u64::from(p.queue_capacity),
            ),
        ];
        for (name, help, kind, value) in columns {
            let rows = providers
                .iter()
                .map(|p| ([("provider", p.id.as_str())], value(p)));
            family(e, name, help, kind, rows)?;
        }
        let state = self.cluster.state().borrow().clone();
        family(
            e,
            "meridian_breaker_open",
            "1 while the provider's breaker is open (or half-open), cluster-wide",
            MetricType::Gauge,
            state
                .breakers
                .iter()
                .map(|(p, r)| ([("provider", p.as_str())], u64::from(r.is_open()))),
        )
    }

    fn admission(&self, e: &mut DescriptorEncoder<'_>) -> Fmt {
        if let Some(q) = self.gateway.quota() {
            let (local_share, denied) = q.no_quorum_counts();
            counter(
                e,
                "meridian_quota_local_share_admissions",
                "Admissions under a local share of a limit (no quorum)",
                local_share,
            )?;
            counter(
                e,
                "meridian_quota_no_quorum_denials",
                "Requests refused because no quota slice could be had (no quorum)",
                denied,
            )?;
        }
        {
            use meridian_actors::mesh::caller::forwarded_total;
            use meridian_actors::mesh::forward::served_total;
            family(
                e,
                "meridian_mesh_calls",
                "Calls forwarded through the actor mesh: sent to the node that reaches the provider, or served here for another node",
                MetricType::Counter,
                [
                    ([("direction", "sent")], forwarded_total()),
                    ([("direction", "served")], served_total()),
                ],
            )?;
        }
        if let Some((hits, misses)) = self.gateway.cache_counts() {
            family(
                e,
                "meridian_cache_lookups",
                "Response cache lookups, by result",
                MetricType::Counter,
                [([("result", "hit")], hits), ([("result", "miss")], misses)],
            )?;
        }
        let b = self.gateway.breaker_stats();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        family(
            e,
            "meridian_breaker_proposals",
            "Breaker changes this node proposed, by kind",
            MetricType::Counter,
            [
                ([("kind", "trip")], load(&b.trips_proposed)),
                ([("kind", "close")], load(&b.closes_proposed)),
            ],
        )?;
        counter(
            e,
            "meridian_breaker_panic_refusals",
            "Trips refused because half of a model's providers were already ejected",
            load(&b.trips_refused_panic),
        )
    }

    /// This node's vLLM replicas: state, restarts, engine load; crashes and scale decisions.
    fn replicas(&self, e: &mut DescriptorEncoder<'_>) -> Fmt {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let st = self.vllm.stats();
        counter(
            e,
            "meridian_vllm_crashes",
            "Replica processes that exited, hung or failed health checks unasked",
            load(&st.crashes),
        )?;
        family(
            e,
            "meridian_vllm_scale_events",
            "Autoscaler decisions (blocked: wanted to scale up, no free GPU or port)",
            MetricType::Counter,
            [
                ([("direction", "up")], load(&st.scale_ups)),
                ([("direction", "down")], load(&st.scale_downs)),
                ([("direction", "blocked")], load(&st.scale_blocked)),
            ],
        )?;
        let replicas = self.vllm.list();
        fn of(r: &meridian_actors::vllm::ReplicaStatus) -> [(&'static str, &str); 2] {
            [("replica", r.name.as_str()), ("group", r.group.as_str())]
        }
        type Column = fn(&meridian_actors::vllm::ReplicaStatus) -> u64;
        let columns: [(&str, &str, MetricType, Column); 5] = [
            (
                "meridian_vllm_replica_ready",
                "1 while the replica is ready and routable",
                MetricType::Gauge,
                |r| u64::from(r.state == ReplicaState::Ready),
            ),
            (
                "meridian_vllm_replica_failed",
                "1 once the replica crashed too often and is no longer restarted",
                MetricType::Gauge,
                |r| u64::from(r.state == ReplicaState::Failed),
            ),
            (
                "meridian_vllm_replica_restarts",
                "Restarts after crashes",
                MetricType::Counter,
                |r| r.restarts,
            ),
            (
                "meridian_vllm_replica_running",
                "Requests running in the engine (its /metrics)",
                MetricType::Gauge,
                |r| u64::from(r.running),
            ),
            (
                "meridian_vllm_replica_waiting",
                "Requests waiting in the engine (its /metrics)",
                MetricType::Gauge,
                |r| u64::from(r.waiting),
            ),
        ];
        for (name, help, kind, value) in columns {
            let rows = replicas.iter().map(|r| (of(r), value(r)));
            family(e, name, help, kind, rows)?;
        }
        family(
            e,
            "meridian_vllm_replica_kv_cache_usage",
            "KV-cache use, 0-1 (its /metrics)",
            MetricType::Gauge,
            replicas.iter().map(|r| (of(r), r.kv_cache_usage)),
        )?;
        // The engine's own time to first token: its histogram, with the engine's buckets.
        let mut m = e.encode_descriptor(
            "meridian_vllm_replica_time_to_first_token_seconds",
            "The engine's own time to first token (its /metrics; restarts with the process)",
            None,
            MetricType::Histogram,
        )?;
        for r in replicas.iter().filter(|r| !r.ttft.buckets.is_empty()) {
            let h = &r.ttft;
            m.encode_family(&of(r))?.encode_histogram::<NoLabelSet>(
                h.sum,
                h.count as u64,
                &h.per_bucket(),
                None,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_their_total_in_prometheus_text() {
        let open = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{x=\"1\"} 2\n\
                    # HELP b_seconds Time.\n# TYPE b_seconds histogram\n# UNIT b_seconds seconds\n\
                    b_seconds_sum 0.5\n# HELP c Up.\n# TYPE c gauge\nc 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(open),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{x=\"1\"} 2\n\
             # HELP b_seconds Time.\n# TYPE b_seconds histogram\nb_seconds_sum 0.5\n\
             # HELP c Up.\n# TYPE c gauge\nc 1\n"
        );
    }
}
