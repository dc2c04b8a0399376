//! `meridian admin usage …`: what calls were made and what they cost.

use clap::Subcommand;
use meridian_proto::pb::admin::{CallRecord, ListCallsRequest};

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
}

impl UsageCommand {
    /// The request this command makes.
    pub fn calls_request(&self) -> ListCallsRequest {
        match self {
            UsageCommand::Calls { tenant, last } => ListCallsRequest {
                tenant: tenant.clone().unwrap_or_default(),
                last: *last,
            },
        }
    }
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
