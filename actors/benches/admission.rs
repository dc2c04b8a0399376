//! The admission check alone: `Quota::admit` for a tenant with a tokens/min and a requests/min
//! limit, against slices granted by an in-memory ledger (the same `ClusterState::apply` Raft
//! runs). The first part goes through the ledger only (no static share) and settles each
//! reservation at its estimate, so the usage is kept and slices run low and are renewed in the
//! background, as in a node under load; it prints how many renewals happened. Then end users:
//! a new user's first request against a known user's, after 1,000 and 1,000,000 users (within
//! their static shares, as in a node). Prints p50/p99/p99.9/max.
//!
//! `cargo bench -p meridian-actors --bench admission`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use meridian_actors::quota::{Estimate, Quota, QuotaConfig, Scope};
use meridian_actors::replicated::{ProposeError, Proposer, Replicated};
use meridian_policy::cost::Billable;
use meridian_proto::cluster::{Applied, ClusterState, Command, Limits, Proposal};
use tokio::sync::watch;

struct Ledger {
    state: Mutex<ClusterState>,
    published: watch::Sender<Arc<ClusterState>>,
}

struct Local(Arc<Ledger>, Arc<std::sync::atomic::AtomicU64>);

impl Proposer for Local {
    fn propose(&self, command: Command) -> BoxFuture<'static, Result<Applied, ProposeError>> {
        let ledger = Arc::clone(&self.0);
        if matches!(command, Command::RequestGrant(_)) {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Box::pin(async move {
            let at_unix_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let mut s = ledger
                .state
                .lock()
                .map_err(|e| ProposeError::Unavailable(e.to_string()))?;
            let applied = s.apply(&Proposal {
                at_unix_ms,
                proposer: 1,
                command,
            });
            ledger.published.send_replace(Arc::new(s.clone()));
            Ok(applied)
        })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ledger = Arc::new(Ledger {
        state: Mutex::new(ClusterState::default()),
        published: watch::Sender::new(Arc::new(ClusterState::default())),
    });
    let grants = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = |config: QuotaConfig| {
        Quota::start(
            1,
            config,
            Replicated {
                node_id: 1,
                state: ledger.published.subscribe(),
                proposer: Arc::new(Local(Arc::clone(&ledger), Arc::clone(&grants))),
            },
        )
    };
    let (quota, _task) = start(QuotaConfig {
        static_share: 0.0,
        ..QuotaConfig::default()
    });
    // A billion tokens and requests a minute: each slice (5 % of the limit) lasts ~10^5
    // admissions of 500 tokens, so a million admissions spend several and renew them.
    let limits = [Scope {
        key: "tenant/acme".into(),
        limits: Limits {
            tokens_per_minute: Some(1_000_000_000),
            requests_per_minute: Some(1_000_000_000),
            ..Limits::default()
        },
    }];
    let used = Billable::plain(200, 300);
    let estimate = Estimate {
        prompt: 200,
        completion: 300,
        price: None,
    };
    // Warm up: the first admissions wait for the first slices.
    for _ in 0..1_000 {
        quota.admit(&limits, estimate).await?.settle(&used);
    }
    let grants_before = grants.load(std::sync::atomic::Ordering::Relaxed);
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let started = Instant::now();
    let n = 1_000_000u64;
    for _ in 0..n {
        let t = Instant::now();
        let r = quota.admit(&limits, estimate).await?;
        h.record(t.elapsed().as_nanos() as u64)?;
        r.settle(&used); // at its estimate: the usage is kept
    }
    let elapsed = started.elapsed();
    let renewals = grants.load(std::sync::atomic::Ordering::Relaxed) - grants_before;
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "admission through the ledger (2 limits, settle included in the loop, not in the timing; \
         {renewals} slice renewals): {n} in {:.2?} ({:.0}/s); p50 {:.3} µs, p99 {:.3} µs, \
         p99.9 {:.3} µs, max {:.1} µs",
        elapsed,
        n as f64 / elapsed.as_secs_f64(),
        us(0.5),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0
    );

    // End users: the tenant's limits plus a per-user tokens/day limit (10,000, the free tier of
    // the design), for a user admitted before and for users never seen (each one's first
    // request), after 1,000 and after 1,000,000 distinct users. The scope keys are built
    // before timing. The ledger here applies at once, but with static shares a user within its
    // share asks it for nothing: the point is that a new user costs what a known one does.
    let user_limits = |u: u64| {
        [
            limits[0].clone(),
            Scope {
                key: format!("tenant/acme/user/u{u}"),
                limits: Limits {
                    tokens_per_day: Some(10_000),
                    ..Limits::default()
                },
            },
        ]
    };
    let known = user_limits(u64::MAX);
    let mut next_user = 0u64;
    // A node as configured by default: static shares on.
    let (quota, _task) = start(QuotaConfig::default());
    let users_seen = |quota: &Quota, from: u64, count: u64| {
        let scopes: Vec<_> = (from..from + count).map(user_limits).collect();
        let quota = quota.clone();
        async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
            for s in &scopes {
                let t = Instant::now();
                let r = quota.admit(s, estimate).await?;
                h.record(t.elapsed().as_nanos() as u64)?;
                drop(r);
            }
            Ok::<_, Box<dyn std::error::Error>>(h)
        }
    };
    let known_user = |quota: &Quota| {
        let quota = quota.clone();
        let known = known.clone();
        async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
            for _ in 0..100_000 {
                let t = Instant::now();
                let r = quota.admit(&known, estimate).await?;
                h.record(t.elapsed().as_nanos() as u64)?;
                drop(r);
            }
            Ok::<_, Box<dyn std::error::Error>>(h)
        }
    };
    let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    // Resident memory after each step: what a user leaves behind on a node's quota (its
    // budgets and share counts), apart from the rest of the node.
    let mut resident = Vec::new();
    for (label, total) in [("1,000", 1_000u64), ("1,000,000", 1_000_000)] {
        // Users before the ones timed (the last 1,000 of `total` are timed).
        while next_user + 1_000 < total {
            let batch = (total - 1_000 - next_user).min(100_000);
            users_seen(&quota, next_user, batch).await?;
            next_user += batch;
        }
        let fresh = users_seen(&quota, next_user, 1_000).await?;
        next_user += 1_000;
        let seen = known_user(&quota).await?;
        println!(
            "per-user limit, after {label} users: a new user's first request p50 {:.3} µs, p99 {:.3} µs; a known user's p50 {:.3} µs, p99 {:.3} µs (new ÷ known at p50: {:.2})",
            q(&fresh, 0.5),
            q(&fresh, 0.99),
            q(&seen, 0.5),
            q(&seen, 0.99),
            q(&fresh, 0.5) / q(&seen, 0.5)
        );
        resident.push((next_user, rss_bytes()));
    }
    if let [(few, before), (many, after)] = resident[..] {
        println!(
            "resident memory: {} MiB after {few} users, {} MiB after {many}: {} bytes per user \
             on the quota (glibc's heap, as the process counts it)",
            before >> 20,
            after >> 20,
            after.saturating_sub(before) / (many - few)
        );
    }
    let entries = ledger
        .published
        .borrow()
        .ledger
        .keys()
        .filter(|k| k.contains("/user/"))
        .count();
    println!("per-user ledger entries after 1,000,000 users (each within its share): {entries}");

    // The estimate that precedes it: counting a short prompt's tokens, for a message seen
    // before (remembered: system prompts and history come back every turn) and for new text.
    let request = meridian_proto::openai::ChatRequest::from_json(
        br#"{"model":"m","max_tokens":16,"messages":[{"role":"user","content":"benchmark"}]}"#,
        &meridian_proto::openai::RequestLimits::default(),
    )?;
    let tokenizer = meridian_actors::estimate::Tokenizer::default();
    let _ = meridian_actors::estimate::prompt_tokens(
        &request,
        &tokenizer,
        meridian_actors::estimate::DEFAULT_IMAGE_TOKENS,
    );
    let mut seen = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for _ in 0..100_000 {
        let t = Instant::now();
        let n = meridian_actors::estimate::prompt_tokens(
            &request,
            &tokenizer,
            meridian_actors::estimate::DEFAULT_IMAGE_TOKENS,
        );
        seen.record(t.elapsed().as_nanos() as u64)?;
        assert!(n > 0);
    }
    let fresh_texts: Vec<String> = (0..100_000)
        .map(|i| format!("benchmark message number {i}, never seen before"))
        .collect();
    let mut fresh = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for text in &fresh_texts {
        let t = Instant::now();
        let n = tokenizer.count(text);
        fresh.record(t.elapsed().as_nanos() as u64)?;
        assert!(n > 0);
    }
    println!(
        "prompt estimate (o200k, one short message): seen before p50 {:.3} µs, p99 {:.3} µs; \
         new text (~10 tokens) p50 {:.3} µs, p99 {:.3} µs",
        q(&seen, 0.5),
        q(&seen, 0.99),
        q(&fresh, 0.5),
        q(&fresh, 0.99),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}

/// This process's resident memory, in bytes (0 where `/proc` cannot tell).
fn rss_bytes() -> u64 {
    let status = procfs::process::Process::myself().and_then(|p| p.status());
    status
        .ok()
        .and_then(|s| s.vmrss)
        .map_or(0, |kib| kib * 1024)
}
