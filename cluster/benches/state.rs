//! The replicated state machine at production scale, through its real apply path (the lock,
//! apply, publish on the watch) and its real snapshot: a state of `--tenants` tenants (default
//! 10,000) with 10 API keys each, `--users` end users seen in the day (default 1,000,000) of
//! which 1 % went beyond their node's static share and so hold a per-user daily ledger entry
//! with a live grant (the others are counted on their nodes only and leave nothing here), and
//! `--days` days (default 90) of daily roll-ups, one model per tenant.
//!
//! Prints: the time to apply and publish one entry (a hot user's first grant, a usage flush of 100
//! reports, a tenant update), p50/p99/max over `--samples` each, and the 50 flushes just after
//! the state machine's two copies joined again; what publishing would cost if
//! the state were copied whole on each apply (a deep copy of its tables, for comparison); the
//! snapshot's size and build time; how long the state machine takes to open it; then, as a
//! Raft member over QUIC with mutual TLS on loopback and production timings: how long the node
//! takes from start to leading with this state again (a restart from its disk), and how long a
//! fresh node added to it takes to be caught up (the snapshot sent in chunks, installed).
//!
//! `cargo bench -p meridian-cluster --bench state` (options: `--tenants N`, `--users N`,
//! `--days N`, `--samples N`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use meridian_cluster::certs;
use meridian_cluster::raft::quic::QuicTransport;
use meridian_cluster::raft::{ClusterNode, RaftTimings, Transport};
use meridian_cluster::state_machine::{REJOIN_AFTER, StateMachine};
use meridian_cluster::{StorageError, TypeConfig};
use meridian_proto::cluster::{
    ApiKeyRecord, ClusterState, Command, GrantRequest, Limits, Member, Proposal, Tenant, Tier,
    UsageTotals,
};
use meridian_proto::ids::hex;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, LogId, Membership};
use sha2::{Digest, Sha256};

mod common;
use common::arg;

/// The node's allocator (see `node/src/main.rs`): the apply path's path copies are many small
/// allocations, and the figures are the node's only with the allocator it runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DAY_MS: u64 = 86_400_000;

/// Feeds entries to the state machine one at a time, as openraft does after each commit.
struct Feeder {
    sm: StateMachine,
    index: u64,
    /// The proposals' clock: inside one day, so nothing the bench made lapses under it.
    at: u64,
}

impl Feeder {
    async fn apply(&mut self, command: Command) -> Result<Duration, StorageError> {
        self.at += 1;
        self.entry(EntryPayload::Normal(Proposal {
            at_unix_ms: self.at,
            proposer: 1,
            command,
        }))
        .await
    }

    async fn entry(&mut self, payload: EntryPayload<TypeConfig>) -> Result<Duration, StorageError> {
        self.index += 1;
        let entry = openraft::Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), self.index),
            payload,
        };
        let started = Instant::now();
        self.sm.apply(vec![entry]).await?;
        Ok(started.elapsed())
    }
}

fn grant(user: u64, tenant: u64, window_start: u64) -> Command {
    Command::RequestGrant(GrantRequest {
        key: format!("tenant/t{tenant}/user/u{user}/tokens_per_day"),
        node: 1,
        limit: 10_000,
        window_ms: DAY_MS,
        window_start_unix_ms: window_start,
        amount: 500,
        ttl_ms: DAY_MS,
        ..GrantRequest::default()
    })
}

/// A tenant's day of use: figures that differ from tenant to tenant and day to day, as real
/// ones do (identical rows would compress to nothing).
fn day_totals(tenant: u64, day: u64) -> UsageTotals {
    let h = Sha256::digest([tenant.to_le_bytes(), day.to_le_bytes()].concat());
    let n = |i: usize| u64::from(u16::from_le_bytes([h[2 * i], h[2 * i + 1]]));
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

fn tenant(id: u64, region: &str) -> Tenant {
    Tenant {
        id: format!("t{id}"),
        tier: "free".into(),
        regions: vec![region.into()],
        ..Tenant::default()
    }
}

fn report(h: Histogram<u64>, what: &str) {
    println!(
        "  {what:<44} p50 {:>8.1} µs  p90 {:>8.1} µs  p99 {:>8.1} µs  max {:>9.1} µs",
        h.value_at_quantile(0.5) as f64 / 1_000.0,
        h.value_at_quantile(0.9) as f64 / 1_000.0,
        h.value_at_quantile(0.99) as f64 / 1_000.0,
        h.max() as f64 / 1_000.0
    );
}

/// Copies every table of `s` into a new, unshared map: what each apply used to pay.
fn deep_copy(s: &ClusterState) -> usize {
    fn copy<K: Clone + Ord, V: Clone>(t: &meridian_proto::cluster::Table<K, V>) -> BTreeMap<K, V> {
        t.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
    let usage: BTreeMap<u64, BTreeMap<String, meridian_proto::cluster::TenantDay>> = s
        .usage
        .iter()
        .map(|(d, t)| {
            let t = t.iter().map(|(k, m)| (k.clone(), m.clone())).collect();
            (*d, t)
        })
        .collect();
    copy(&s.members).len()
        + copy(&s.providers).len()
        + copy(&s.tiers).len()
        + copy(&s.tenants).len()
        + copy(&s.api_keys).len()
        + (s.ledger.iter())
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>()
            .len()
        + copy(&s.breakers).len()
        + usage.len()
        + copy(&s.applied_seq).len()
}

/// `samples` runs of a bare arithmetic loop that takes about `length` each, timed as the
/// applies are.
fn busy_loop(length: Duration, samples: u64) -> Result<Histogram<u64>, Box<dyn std::error::Error>> {
    let spin = |n: u64| {
        let mut x = 1u64;
        for _ in 0..n {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        }
        std::hint::black_box(x);
    };
    let calibrating = Instant::now();
    spin(10_000_000);
    let per_iteration = calibrating.elapsed().as_secs_f64() / 10_000_000.0;
    let n = (length.as_secs_f64() / per_iteration) as u64;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for _ in 0..samples {
        let started = Instant::now();
        spin(n);
        h.saturating_record(started.elapsed().as_nanos() as u64);
    }
    Ok(h)
}

/// This process's resident memory, in MiB (0 where `/proc` cannot tell).
fn rss_mib() -> u64 {
    let status = procfs::process::Process::myself().and_then(|p| p.status());
    status
        .ok()
        .and_then(|s| s.vmrss)
        .map_or(0, |kib| kib / 1024)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tenants = arg("--tenants", 10_000);
    let users = arg("--users", 1_000_000);
    let days = arg("--days", 90);
    let samples = arg("--samples", 2_000);
    let dir = tempfile::tempdir()?;
    // The state machine of node 1's data directory, as a node lays it out: the state is fed to
    // it directly (as committed entries would be), so the node later starts as one whose log
    // was compacted into its snapshot.
    let pki = tempfile::tempdir()?;
    certs::init_ca(pki.path(), &pki.path().join("issuer/ca.key"))?;
    let rpc_timeout = RaftTimings::default().election_min;
    let mut transports = Vec::new();
    for id in [1, 2] {
        certs::issue(pki.path(), &pki.path().join("issuer/ca.key"), id, &[])?;
        transports.push(QuicTransport::bind(
            "127.0.0.1:0".parse()?,
            pki.path(),
            id,
            rpc_timeout,
        )?);
    }
    let addr = |i: usize| -> Result<String, Box<dyn std::error::Error>> {
        Ok(transports[i].local_addr()?.to_string())
    };
    let mut f = Feeder {
        sm: StateMachine::open(&dir.path().join("state"))?,
        index: 0,
        at: 1_000 * DAY_MS,
    };
    let today = f.at - f.at % DAY_MS;
    f.entry(EntryPayload::Membership(Membership::new(
        vec![[1].into()],
        BTreeMap::from([(1, BasicNode::new(addr(0)?))]),
    )))
    .await?;

    // Node 1's own record, as it writes it at every start.
    f.apply(Command::UpsertMember(Member {
        id: 1,
        region: "eu".into(),
        raft_addr: addr(0)?,
        http_addr: String::new(),
        mesh_addr: String::new(),
        started_unix_ms: f.at,
        snapshot_format: meridian_cluster::state_machine::SNAPSHOT_FORMAT,
    }))
    .await?;

    let started = Instant::now();
    f.apply(Command::UpsertTier(Tier {
        name: "free".into(),
        limits: Limits::default(),
        per_user: Limits {
            tokens_per_day: Some(10_000),
            ..Limits::default()
        },
    }))
    .await?;
    let batch = |commands: Vec<Command>| Command::Batch { commands };
    // Written in bulk (entries of 10,000 commands): the state machine joins its two copies
    // after each, so the state is held once, as a node restoring it from a snapshot holds it.
    // Smaller entries would leave it held twice until the copies next join.
    for chunk in (0..tenants).collect::<Vec<_>>().chunks(10_000) {
        f.apply(batch(
            chunk
                .iter()
                .map(|t| Command::UpsertTenant(tenant(*t, "eu")))
                .collect(),
        ))
        .await?;
    }
    let keys: Vec<u64> = (0..tenants * 10).collect();
    for chunk in keys.chunks(10_000) {
        f.apply(batch(
            chunk
                .iter()
                .map(|k| {
                    // As random as real keys' ids and digests, which no compressor shrinks.
                    let digest = Sha256::digest(k.to_le_bytes());
                    Command::CreateApiKey(ApiKeyRecord {
                        id: hex(&digest[..6]),
                        tenant: format!("t{}", k % tenants),
                        sha256_hex: hex(&Sha256::digest(digest)),
                        label: String::new(),
                        created_at_unix_ms: 0,
                        revoked_at_unix_ms: None,
                    })
                })
                .collect(),
        ))
        .await?;
    }
    // Only the hot 1 % reach the ledger.
    let all_users: Vec<u64> = (0..users).filter(|u| u % 100 == 0).collect();
    for chunk in all_users.chunks(10_000) {
        f.apply(batch(
            chunk
                .iter()
                .map(|u| grant(*u, u % tenants, today))
                .collect(),
        ))
        .await?;
    }
    // Roll-ups: the days before today, written as each day's flushes would have left them.
    let start_day = f.at / DAY_MS;
    let now = f.at;
    for day in 0..days {
        f.at = (start_day - days + day) * DAY_MS + 1;
        let all: Vec<u64> = (0..tenants).collect();
        for chunk in all.chunks(10_000) {
            f.apply(batch(
                chunk
                    .iter()
                    .map(|t| Command::RecordUsage {
                        tenant: format!("t{t}"),
                        model: "llama-3.1-8b".into(),
                        totals: day_totals(*t, day),
                        retain_days: days + 1,
                        provider: "vllm-a".into(),
                        feature: String::new(),
                        user: String::new(),
                        max_users: 1_000,
                        day: None,
                    })
                    .collect(),
            ))
            .await?;
        }
    }
    f.at = now;
    let state = f.sm.subscribe().borrow().clone();
    println!(
        "state: {} tenants, {} API keys, {} ledger entries ({users} users, 1 % hot), {} days of roll-ups; built in {:.1} s; RSS {} MiB",
        state.tenants.len(),
        state.api_keys.len(),
        state.ledger.len(),
        state.usage.len(),
        started.elapsed().as_secs_f64(),
        rss_mib()
    );

    println!("apply + publish one entry ({samples} samples each):");
    let mut new_user = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for i in 0..samples {
        new_user.saturating_record(
            f.apply(grant(users + i, i % tenants, today))
                .await?
                .as_nanos() as u64,
        );
    }
    report(new_user, "a hot user's first grant");
    // The `i`th flush: 100 hot users' entries (the ones in the ledger), the next 100 each time.
    let flush_of = |i: u64| {
        let reports = (0..100)
            .map(|j| {
                let user = ((i * 100 + j) % (users / 100).max(1)) * 100;
                (user, user % tenants)
            })
            .map(|(user, tenant)| Command::ReportUsage {
                key: format!("tenant/t{tenant}/user/u{user}/tokens_per_day"),
                node: 1,
                window_start_unix_ms: today,
                delta: 7,
                limit: 10_000,
                window_ms: DAY_MS,
            })
            .collect();
        batch(reports)
    };
    let mut flush = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for i in 0..samples {
        flush.saturating_record(f.apply(flush_of(i)).await?.as_nanos() as u64);
    }
    let flush_p50 = Duration::from_nanos(flush.value_at_quantile(0.5));
    report(flush, "a usage flush of 100 reports");
    // What this machine does to any run of that length: its timer interrupts and the like
    // stall a few samples in a hundred, whatever the code.
    report(
        busy_loop(flush_p50, samples)?,
        "  for scale: a bare loop as long as its p50",
    );
    // The state machine's two copies join every `REJOIN_AFTER` (the run above is shorter):
    // the flushes just after pay for copying what they change until it has parted again.
    f.sm.join_after(Duration::ZERO);
    f.apply(flush_of(samples)).await?;
    f.sm.join_after(REJOIN_AFTER);
    let mut joined = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for i in samples + 1..samples + 51 {
        joined.saturating_record(f.apply(flush_of(i)).await?.as_nanos() as u64);
    }
    report(joined, "  the 50 flushes after the copies joined");
    let mut update = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for i in 0..samples {
        let region = if i % 2 == 0 { "us" } else { "eu" };
        update.saturating_record(
            f.apply(Command::UpsertTenant(tenant(i % tenants, region)))
                .await?
                .as_nanos() as u64,
        );
    }
    report(update, "a tenant update");
    // The state machine's two copies each hold their own copy of what these applies changed
    // (the bulk writes that built the state joined them: see `state_machine`).
    println!("  RSS after them: {} MiB", rss_mib());

    let state = f.sm.subscribe().borrow().clone();
    let copy_started = Instant::now();
    let copied = deep_copy(&state);
    println!(
        "  for comparison, a deep copy of the state ({copied} top-level entries), once per apply before tables were shared: {:.1} ms",
        copy_started.elapsed().as_secs_f64() * 1_000.0
    );

    let snap_started = Instant::now();
    let snapshot = f.sm.build_snapshot().await?;
    let built = snap_started.elapsed();
    let data = snapshot.snapshot.get_ref();
    // Node 1 recorded that it reads compressed snapshots, so the body is a zstd frame.
    let raw = zstd::decode_all(&data[..])?.len();
    println!(
        "snapshot: {:.1} MB ({:.1} MB of MessagePack, compressed), built (encoded, compressed and written with fsync) in {:.2} s",
        data.len() as f64 / 1e6,
        raw as f64 / 1e6,
        built.as_secs_f64()
    );
    drop(snapshot);
    drop(state);
    drop(f);
    let open_started = Instant::now();
    let reopened = StateMachine::open(&dir.path().join("state"))?;
    let n = reopened.subscribe().borrow().ledger.len();
    println!(
        "restart: the state machine reopened from its snapshot ({n} ledger entries) in {:.2} s; RSS {} MiB",
        open_started.elapsed().as_secs_f64(),
        rss_mib()
    );
    drop(reopened);

    // Node 1 starts on that directory as a Raft member and leads again (its election timeout
    // included): the node's restart from its disk.
    let started = Instant::now();
    let transport: Arc<dyn Transport> = Arc::new(Arc::clone(&transports[0]));
    let one = ClusterNode::start(1, dir.path(), RaftTimings::default(), transport).await?;
    let _serve_one = transports[0].serve(one.clone());
    one.wait_for_leader(1, Duration::from_secs(60)).await?;
    let tenants_there = one.state().borrow().tenants.len();
    println!(
        "restart: node 1 opened its log and state and leads again ({tenants_there} tenants) in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    // A fresh node joins: the leader sends the snapshot in chunks, the node installs it.
    let fresh = tempfile::tempdir()?;
    let transport: Arc<dyn Transport> = Arc::new(Arc::clone(&transports[1]));
    let two = ClusterNode::start(2, fresh.path(), RaftTimings::default(), transport).await?;
    let _serve_two = transports[1].serve(two.clone());
    let target = one.status().applied_index;
    let started = Instant::now();
    one.add_learner(2, addr(1)?).await?;
    let mut state = two.state();
    while two.status().applied_index < target {
        if started.elapsed() > Duration::from_secs(300) {
            return Err("the fresh node did not catch up within 300 s".into());
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), state.changed()).await;
    }
    let caught = started.elapsed();
    let (tenants_two, keys_two) = {
        let s = two.state().borrow().clone();
        (s.tenants.len(), s.api_keys.len())
    };
    println!(
        "catch-up: a fresh node added as a learner holds the state ({tenants_two} tenants, {keys_two} API keys) in {:.2} s",
        caught.as_secs_f64()
    );
    if tenants_two != tenants_there {
        return Err("the fresh node's state differs from the leader's".into());
    }
    two.shutdown().await;
    one.shutdown().await;
    for t in &transports {
        t.close();
    }
    Ok(())
}
