//! The admin API's usage answers: this node's per-call records, and cluster-wide reports from
//! the replicated daily roll-ups.

use meridian_cluster::raft::ClusterNode;
use meridian_proto::cluster::{UsageDimension, day_of, report as sum_days, utc_date};
use meridian_proto::pb::admin as pb;
use tonic::Status;

use super::field;

/// The newest per-call records of this node's call log.
pub(super) async fn list_calls(
    log: Option<std::path::PathBuf>,
    req: pb::ListCallsRequest,
) -> Result<pb::ListCallsResponse, Status> {
    let Some(path) = log else {
        return Err(Status::failed_precondition(
            "this node keeps no call log ([calls] enabled = false)",
        ));
    };
    if req.last > 1_000 {
        return Err(field("last", "is at most 1000"));
    }
    let last = if req.last == 0 { 20 } else { req.last };
    let tenant = (!req.tenant.is_empty()).then_some(req.tenant);
    let calls =
        tokio::task::spawn_blocking(move || crate::calls::newest(&path, tenant.as_deref(), last))
            .await
            .map_err(|e| Status::internal(format!("the call log query stopped: {e}")))?
            .map_err(|e| Status::unavailable(format!("the call log cannot be read: {e}")))?;
    Ok(pb::ListCallsResponse { calls })
}

/// The last `days` UTC days of the replicated roll-ups, summed by one dimension: a
/// linearizable read, so every node answers with every roll-up committed before it was asked.
pub(super) async fn report(
    cluster: &ClusterNode,
    req: pb::UsageReportRequest,
) -> Result<pb::UsageReportResponse, Status> {
    let days = match req.days {
        0 => 7,
        d @ 1..=3_660 => u64::from(d),
        _ => return Err(field("days", "is between 1 and 3660")),
    };
    let by_name = if req.by.is_empty() { "tenant" } else { &req.by };
    let Some(by) = UsageDimension::parse(by_name) else {
        return Err(field(
            "by",
            &format!("{by_name:?} is not one of tenant, model, provider, feature, user"),
        ));
    };
    let tenant = (!req.tenant.is_empty()).then_some(req.tenant.as_str());
    let (state, applied_index) = (cluster.read_linearizable().await).map_err(|e| {
        let mut s = Status::unavailable(format!("no linearizable read of the roll-ups: {e}"));
        s.metadata_mut().insert(
            "retry-after",
            tonic::metadata::MetadataValue::from_static("1"),
        );
        s
    })?;
    let today = day_of(cluster.now_ms());
    let first = today.saturating_sub(days - 1);
    let rows = sum_days(
        state.usage.iter().map(|(day, tenants)| (*day, tenants)),
        first,
        today,
        tenant,
        by,
    )
    .into_iter()
    .map(|r| pb::UsageReportRow {
        key: r.key,
        requests: r.totals.requests,
        input_tokens: r.totals.prompt_tokens,
        output_tokens: r.totals.completion_tokens,
        cached_tokens: r.totals.cached_tokens,
        cost_micro_usd: r.totals.cost_micro_usd,
        cache_hits: r.totals.cache_hits,
    })
    .collect();
    Ok(pb::UsageReportResponse {
        rows,
        from_day: utc_date(first),
        to_day: utc_date(today),
        applied_index,
        by: by.name().to_owned(),
    })
}
