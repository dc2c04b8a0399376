//! A replicated state at production scale, written into a node's data directory before the
//! node first starts (as the snapshot it restores): `tenants` tenants with 10 API keys each,
//! `hot_users` end users holding a per-user daily ledger entry with a live grant (the 1 % of a
//! day's users that go beyond their node's static share; the others leave nothing
//! replicated), and `days` days of daily roll-ups, one model per tenant. Besides them, tenant
//! `bench` on tier `bench` (the given limits) holds the key given, so a client can call the node.
//!
//! The node then starts as one whose log was compacted into its snapshot, and serves from the
//! state as it would after months of traffic.

use std::collections::BTreeMap;
use std::path::Path;

use meridian_actors::auth::sha256_hex;
use meridian_cluster::state_machine::StateMachine;
use meridian_cluster::{StorageError, TypeConfig};
use meridian_proto::cluster::{
    ApiKeyRecord, Command, GrantRequest, Limits, Proposal, Tenant, Tier, UsageTotals,
};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, LogId, Membership};

const DAY_MS: u64 = 86_400_000;

/// How large a state to write.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub tenants: u64,
    pub hot_users: u64,
    pub days: u64,
}

impl Scale {
    /// The scale the replicated core is held to: 10,000 tenants (100,000 keys), 1,000,000
    /// users of whom 1 % hot, 90 days of roll-ups.
    pub const PRODUCTION: Scale = Scale {
        tenants: 10_000,
        hot_users: 10_000,
        days: 90,
    };

    /// Only the `bench` tenant and its key.
    pub const EMPTY: Scale = Scale {
        tenants: 0,
        hot_users: 0,
        days: 0,
    };
}

/// Feeds committed entries to a state machine, one index after another.
struct Feeder {
    sm: StateMachine,
    index: u64,
    at: u64,
}

impl Feeder {
    async fn entry(&mut self, payload: EntryPayload<TypeConfig>) -> Result<(), StorageError> {
        self.index += 1;
        let entry = openraft::Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), self.index),
            payload,
        };
        self.sm.apply(vec![entry]).await.map(drop)
    }

    async fn batch(&mut self, commands: Vec<Command>) -> Result<(), StorageError> {
        if commands.is_empty() {
            return Ok(());
        }
        self.entry(EntryPayload::Normal(Proposal {
            at_unix_ms: self.at,
            proposer: 1,
            command: Command::Batch { commands },
        }))
        .await
    }
}

/// Writes the state into `data_dir` (a single node, id 1, with no `[cluster]` section) and
/// its snapshot; `bench` is the `bench` tenant's tier limits and `key` its key.
pub async fn write(
    data_dir: &Path,
    scale: Scale,
    bench: Limits,
    key: &meridian_actors::auth::NewKey,
) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let today = now - now % DAY_MS;
    let mut f = Feeder {
        sm: StateMachine::open(&data_dir.join("raft").join("state"))?,
        index: 0,
        at: now,
    };
    // As a single node initializes itself: one voter, no address.
    f.entry(EntryPayload::Membership(Membership::new(
        vec![[1].into()],
        BTreeMap::from([(1, BasicNode::new(""))]),
    )))
    .await?;
    let tier = |name: &str, limits: Limits, per_user: Limits| {
        Command::UpsertTier(Tier {
            name: name.into(),
            limits,
            per_user,
        })
    };
    let per_user = Limits {
        tokens_per_day: Some(10_000),
        ..Limits::default()
    };
    f.batch(vec![
        tier("free", Limits::default(), per_user),
        tier("bench", bench, Limits::default()),
        Command::UpsertTenant(Tenant {
            id: "bench".into(),
            tier: "bench".into(),
            ..Tenant::default()
        }),
        key_record(&key.id, "bench", &key.sha256_hex),
    ])
    .await?;
    let tenants: Vec<u64> = (0..scale.tenants).collect();
    for chunk in tenants.chunks(1_000) {
        let commands = chunk.iter().map(|t| {
            Command::UpsertTenant(Tenant {
                id: format!("t{t}"),
                tier: "free".into(),
                ..Tenant::default()
            })
        });
        f.batch(commands.collect()).await?;
    }
    let keys: Vec<u64> = (0..scale.tenants * 10).collect();
    for chunk in keys.chunks(10_000) {
        let commands = chunk.iter().map(|k| {
            // As random as real keys' ids and digests, which no compressor shrinks.
            let digest = sha256_hex(&k.to_le_bytes());
            key_record(
                &digest[..12],
                &format!("t{}", k % scale.tenants),
                &sha256_hex(digest.as_bytes()),
            )
        });
        f.batch(commands.collect()).await?;
    }
    let users: Vec<u64> = (0..scale.hot_users).collect();
    for chunk in users.chunks(10_000) {
        let commands = chunk.iter().map(|u| {
            Command::RequestGrant(GrantRequest {
                key: format!("tenant/t{}/user/u{u}/tokens_per_day", u % scale.tenants),
                node: 1,
                limit: 10_000,
                window_ms: DAY_MS,
                window_start_unix_ms: today,
                amount: 500,
                ttl_ms: DAY_MS,
                ..GrantRequest::default()
            })
        });
        f.batch(commands.collect()).await?;
    }
    // The days before today, as each day's usage flushes would have left them.
    for day in (1..=scale.days).rev() {
        f.at = today - day * DAY_MS + 1;
        for chunk in tenants.chunks(5_000) {
            let commands = chunk.iter().map(|t| Command::RecordUsage {
                tenant: format!("t{t}"),
                model: "llama-3.1-8b".into(),
                totals: day_totals(*t, day),
                retain_days: scale.days + 1,
                provider: "vllm-a".into(),
                feature: String::new(),
                user: String::new(),
                max_users: 1_000,
                day: None,
            });
            f.batch(commands.collect()).await?;
        }
    }
    f.sm.build_snapshot().await?;
    Ok(())
}

/// A tenant's day of use: figures that differ from tenant to tenant and day to day, as real
/// ones do (identical rows would compress to nothing).
fn day_totals(tenant: u64, day: u64) -> UsageTotals {
    let h = sha256_hex(&[tenant.to_le_bytes(), day.to_le_bytes()].concat());
    let n = |i: usize| u64::from_str_radix(&h[4 * i..4 * i + 4], 16).unwrap_or(0);
    let requests = 1 + n(0) % 2_000;
    let prompt_tokens = requests * (50 + n(1) % 2_000);
    let completion_tokens = requests * (10 + n(2) % 500);
    UsageTotals {
        requests,
        prompt_tokens,
        completion_tokens,
        cached_tokens: prompt_tokens * (n(3) % 50) / 100,
        cost_micro_usd: (prompt_tokens + 4 * completion_tokens) / 10,
        cache_hits: n(4) % 20,
    }
}

fn key_record(id: &str, tenant: &str, sha256_hex: &str) -> Command {
    Command::CreateApiKey(ApiKeyRecord {
        id: id.into(),
        tenant: tenant.into(),
        sha256_hex: sha256_hex.into(),
        label: String::new(),
        created_at_unix_ms: 0,
        revoked_at_unix_ms: None,
    })
}
