//! `meridian admin usage …`: what calls were made and what they cost.

use clap::{Subcommand, ValueEnum};
use meridian_proto::pb::admin::{
    CallRecord, ListCallsRequest, UsageReportRequest, UsageReportResponse,
};

#[derive(Subcommand)]
pub enum UsageCommand {
    /// The newest calls this node served, from its call log, newest first.
    Calls {
        /// Only this tenant's calls.
        #[arg(long)]
        tenant: Option<String>,
        /// How many (at most 1000).
        #[arg(long, default_value_t = 20)]
        last: u32,
    },
    /// Cluster-wide usage and cost over the last days (UTC, today included), from the
    /// replicated daily roll-ups: any node gives the same answer.
    Report {
        #[arg(long, default_value_t = 7)]
        days: u32,
        #[arg(long, value_enum, default_value_t = By::Tenant)]
        by: By,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

/// What a report groups by.
#[derive(Clone, Copy, ValueEnum)]
pub enum By {
    Tenant,
    Model,
    Provider,
    Feature,
    User,
}

/// How a report is printed.
#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

impl By {
    fn name(self) -> &'static str {
        match self {
            By::Tenant => "tenant",
            By::Model => "model",
            By::Provider => "provider",
            By::Feature => "feature",
            By::User => "user",
        }
    }
}

/// A report asked for: the request, and how to print its answer.
pub struct ReportAsked {
    pub request: UsageReportRequest,
    pub format: Format,
}

impl UsageCommand {
    /// The calls listing this command asks for, if it is one.
    pub fn calls_request(&self) -> Option<ListCallsRequest> {
        match self {
            UsageCommand::Calls { tenant, last } => Some(ListCallsRequest {
                tenant: tenant.clone().unwrap_or_default(),
                last: *last,
            }),
            UsageCommand::Report { .. } => None,
        }
    }

    /// The report this command asks for, if it is one.
    pub fn report_request(&self) -> Option<ReportAsked> {
        match self {
            UsageCommand::Report {
                days,
                by,
                tenant,
                format,
            } => Some(ReportAsked {
                request: UsageReportRequest {
                    days: *days,
                    by: by.name().to_owned(),
                    tenant: tenant.clone().unwrap_or_default(),
                },
                format: *format,
            }),
            UsageCommand::Calls { .. } => None,
        }
    }
}

/// What an empty key of a report stands for: calls that named no such thing.
fn shown(key: &str) -> &str {
    if key.is_empty() { "(none)" } else { key }
}

/// A report as a table, CSV (one header line, one line per group) or JSON.
pub fn print_report(r: &UsageReportResponse, format: Format) -> anyhow::Result<()> {
    let dollars = |micro: u64| format!("{:.6}", micro as f64 / 1e6);
    match format {
        Format::Table => {
            println!(
                "usage by {} from {} to {} (UTC), as of Raft index {}",
                r.by, r.from_day, r.to_day, r.applied_index
            );
            if r.rows.is_empty() {
                println!("no usage recorded");
                return Ok(());
            }
            println!(
                "{:<28} {:>10} {:>14} {:>14} {:>12} {:>10} {:>14}",
                r.by, "requests", "input tokens", "output tokens", "cached", "cache hits", "cost $"
            );
            for row in &r.rows {
                println!(
                    "{:<28} {:>10} {:>14} {:>14} {:>12} {:>10} {:>14}",
                    shown(&row.key),
                    row.requests,
                    row.input_tokens,
                    row.output_tokens,
                    row.cached_tokens,
                    row.cache_hits,
                    dollars(row.cost_micro_usd)
                );
            }
        }
        Format::Csv => {
            let mut out = csv::Writer::from_writer(std::io::stdout());
            out.write_record([
                r.by.as_str(),
                "requests",
                "input_tokens",
                "output_tokens",
                "cached_tokens",
                "cache_hits",
                "cost_usd",
            ])?;
            for row in &r.rows {
                out.write_record([
                    row.key.clone(),
                    row.requests.to_string(),
                    row.input_tokens.to_string(),
                    row.output_tokens.to_string(),
                    row.cached_tokens.to_string(),
                    row.cache_hits.to_string(),
                    dollars(row.cost_micro_usd),
                ])?;
            }
            out.flush()?;
        }
        Format::Json => {
            let rows: Vec<serde_json::Value> = r
                .rows
                .iter()
                .map(|row| {
                    serde_json::json!({
                        r.by.as_str(): row.key,
                        "requests": row.requests,
                        "input_tokens": row.input_tokens,
                        "output_tokens": row.output_tokens,
                        "cached_tokens": row.cached_tokens,
                        "cache_hits": row.cache_hits,
                        "cost_micro_usd": row.cost_micro_usd,
                    })
                })
                .collect();
            let doc = serde_json::json!({
                "by": r.by,
                "from": r.from_day,
                "to": r.to_day,
                "applied_index": r.applied_index,
                "rows": rows,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
    }
    Ok(())
}

/// One line per call.
pub fn print_calls(calls: &[CallRecord]) {
    if calls.is_empty() {
        println!("no calls recorded");
        return;
    }
    println!(
        "{:<24} {:<12} {:<10} {:<20} {:<14} {:<18} {:>6} {:>6} {:>9} {:>9} {:>10}  request",
        "time (UTC)",
        "tenant",
        "feature",
        "model",
        "provider",
        "code",
        "in",
        "out",
        "ttft ms",
        "total ms",
        "cost $"
    );
    for c in calls {
        let ttft = if c.stream {
            format!("{:.0}", c.ttft_ms)
        } else {
            "-".to_owned()
        };
        println!(
            "{:<24} {:<12} {:<10} {:<20} {:<14} {:<18} {:>6} {:>6} {:>9} {:>9.0} {:>10.6}  {}",
            utc(c.time_unix_ms),
            c.tenant,
            c.feature,
            c.model,
            c.provider,
            c.code,
            c.input_tokens,
            c.output_tokens,
            ttft,
            c.duration_ms,
            c.cost_micro_usd as f64 / 1e6,
            c.request_id,
        );
    }
}

/// `unix_ms` as an ISO 8601 UTC time to the millisecond.
fn utc(unix_ms: u64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}
