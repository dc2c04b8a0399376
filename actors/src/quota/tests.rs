//! Admission against grants, with the ledger applied in memory (the same `ClusterState::apply`
//! Raft runs), shared by several "nodes".

use std::sync::atomic::AtomicBool;

use futures::future::BoxFuture;
use meridian_proto::cluster::{
    Applied, ClusterState, GrantRequest, Member, Proposal, Tenant, Tier, day_of,
};
use tokio::sync::watch;

use super::sync::MAX_FLUSH_BYTES;
use super::*;
use crate::replicated::{ProposeError, Proposer};

/// One in-memory cluster: proposals are applied at once; `down` makes every proposal fail
/// (no quorum).
struct Ledger {
    state: Mutex<ClusterState>,
    published: watch::Sender<Arc<ClusterState>>,
    down: AtomicBool,
    /// The next proposal commits, but its answer is lost (the leader died after committing).
    lose_next_ack: AtomicBool,
    /// While set, a share release's proposal waits for a permit here (its release is under
    /// way until then).
    release_gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// Share releases proposed so far; whether the next one fails unapplied.
    releases_proposed: AtomicU64,
    fail_next_release: AtomicBool,
    /// Grant requests and usage reports proposed so far (what a scope costs the ledger).
    grants_and_reports: AtomicU64,
    /// The wall clock of every node on this ledger and of its proposals (Unix ms): set by the
    /// tests, so that no test depends on where in a minute it happens to run.
    clock: Arc<AtomicU64>,
}

/// Where the tests' clocks start: a second into a minute (and a day, and a month).
const TEST_START_MS: u64 = 1_767_225_601_000; // 2026-01-01T00:00:01Z

struct NodeProposer {
    ledger: Arc<Ledger>,
    node: NodeId,
}

impl Proposer for NodeProposer {
    fn propose(&self, command: Command) -> BoxFuture<'static, Result<Applied, ProposeError>> {
        let ledger = Arc::clone(&self.ledger);
        let node = self.node;
        Box::pin(async move {
            ledger
                .grants_and_reports
                .fetch_add(grants_and_reports(&command), Ordering::Relaxed);
            if matches!(command, Command::ReleaseShare { .. }) {
                ledger.releases_proposed.fetch_add(1, Ordering::Relaxed);
                let gate = lock(&ledger.release_gate).clone();
                if let Some(gate) = gate {
                    gate.acquire().await.expect("the gate stays open").forget();
                }
                if ledger.fail_next_release.swap(false, Ordering::Relaxed) {
                    return Err(ProposeError::Unavailable("the release was lost".into()));
                }
            }
            if ledger.down.load(Ordering::Relaxed) {
                return Err(ProposeError::Unavailable("no leader is known".into()));
            }
            let mut s = lock(&ledger.state);
            let applied = s.apply(&Proposal {
                at_unix_ms: ledger.clock.load(Ordering::Relaxed),
                proposer: node,
                command,
            });
            ledger.published.send_replace(Arc::new(s.clone()));
            if ledger.lose_next_ack.swap(false, Ordering::Relaxed) {
                return Err(ProposeError::Unavailable(
                    "the leader went away before answering".into(),
                ));
            }
            Ok(applied)
        })
    }
}

fn grants_and_reports(command: &Command) -> u64 {
    match command {
        Command::RequestGrant(_) | Command::ReportUsage { .. } => 1,
        Command::Once { command, .. } => grants_and_reports(command),
        Command::Batch { commands } => commands.iter().map(grants_and_reports).sum(),
        _ => 0,
    }
}

fn ledger(nodes: u64) -> Arc<Ledger> {
    let mut s = ClusterState::default();
    for id in 1..=nodes {
        s.members.insert(
            id,
            Member {
                id,
                region: "r".into(),
                raft_addr: String::new(),
                http_addr: String::new(),
                mesh_addr: String::new(),
                started_unix_ms: 0,
                snapshot_format: 0,
            },
        );
    }
    s.tiers.insert(
        "t".into(),
        Tier {
            name: "t".into(),
            ..Tier::default()
        },
    );
    s.tenants.insert(
        "acme".into(),
        Tenant {
            id: "acme".into(),
            tier: "t".into(),
            ..Tenant::default()
        },
    );
    Arc::new(Ledger {
        published: watch::Sender::new(Arc::new(s.clone())),
        state: Mutex::new(s),
        down: AtomicBool::new(false),
        lose_next_ack: AtomicBool::new(false),
        release_gate: Mutex::new(None),
        releases_proposed: AtomicU64::new(0),
        fail_next_release: AtomicBool::new(false),
        grants_and_reports: AtomicU64::new(0),
        clock: Arc::new(AtomicU64::new(TEST_START_MS)),
    })
}

fn node(ledger: &Arc<Ledger>, id: NodeId, config: QuotaConfig) -> Quota {
    let config = QuotaConfig {
        clock: WallClock::set_by(Arc::clone(&ledger.clock)),
        ..config
    };
    Quota::start(
        id,
        config,
        Replicated {
            node_id: id,
            state: ledger.published.subscribe(),
            proposer: Arc::new(NodeProposer {
                ledger: Arc::clone(ledger),
                node: id,
            }),
        },
    )
    .0
}

/// A ledger and `count` nodes on it, each with the default configuration.
fn cluster(count: u64) -> (Arc<Ledger>, Vec<Quota>) {
    let ledger = ledger(count);
    let nodes = (1..=count)
        .map(|id| node(&ledger, id, QuotaConfig::default()))
        .collect();
    (ledger, nodes)
}

/// A ledger with one node on it, configured by `config`.
fn lone_node(config: QuotaConfig) -> (Arc<Ledger>, Quota) {
    let ledger = ledger(1);
    let q = node(&ledger, 1, config);
    (ledger, q)
}

/// Every scope through the ledger (no static shares): for the tests of grants and reports.
fn ledger_only() -> QuotaConfig {
    QuotaConfig {
        static_share: 0.0,
        ..QuotaConfig::default()
    }
}

/// A call of `model` with no provider, feature or user named.
fn rollup_key(model: &str) -> RollupKey<'_> {
    RollupKey {
        model,
        provider: "",
        feature: "",
        user: "",
    }
}

/// One call's roll-up of `prompt` and `completion` tokens.
fn usage_of(prompt: u64, completion: u64) -> UsageTotals {
    UsageTotals {
        requests: 1,
        prompt_tokens: prompt,
        completion_tokens: completion,
        ..UsageTotals::default()
    }
}

/// Records the roll-up of one call of acme's model `m` on `day`.
fn record_call(q: &Quota, day: u64, prompt: u64, completion: u64) {
    let tenant: Arc<str> = "acme".into();
    q.record(&tenant, day, rollup_key("m"), &usage_of(prompt, completion));
}

/// Ends a call of acme's model `m` as the edge does: settles `r` at what it used and records
/// its roll-up on the day the ledger's clock is in.
fn finish_call(q: &Quota, ledger: &Ledger, r: Reservation, prompt: u64, completion: u64) {
    r.settle(&Billable::plain(prompt, completion));
    let day = day_of(ledger.clock.load(Ordering::Relaxed));
    record_call(q, day, prompt, completion);
}

fn tokens(n: u64) -> Estimate {
    Estimate {
        prompt: n / 2,
        completion: n - n / 2,
        price: None,
    }
}

fn tenant_scope(limits: Limits) -> Vec<Scope> {
    vec![Scope {
        key: "tenant/acme".into(),
        limits,
    }]
}

/// What `q` has charged to acme's budget for `kind` (None: it holds no such budget).
fn charged_to(q: &Quota, kind: LimitKind) -> Option<i64> {
    lock(&q.inner.budgets)
        .map
        .get(&ScopeKind("tenant/acme", kind))
        .map(|b| b.charged)
}

/// Limits of `tokens_per_minute` alone.
fn tpm_limits(limit: u64) -> Limits {
    Limits {
        tokens_per_minute: Some(limit),
        ..Limits::default()
    }
}

fn tpm(limit: u64) -> Vec<Scope> {
    tenant_scope(tpm_limits(limit))
}

#[tokio::test]
async fn three_nodes_never_admit_more_than_the_limit_together() {
    let (_, nodes) = cluster(3);
    let limits = tpm(10_000);
    let mut admitted = 0;
    let mut refused = None;
    // Far more demand than the limit, spread over the nodes.
    for i in 0..400 {
        match nodes[i % 3].admit(&limits, tokens(100)).await {
            Ok(r) => {
                admitted += 100;
                std::mem::forget(r); // charged in full
            }
            Err(e) => refused = Some(e),
        }
    }
    assert!(admitted <= 10_000, "over-admitted: {admitted}");
    let e = refused.expect("the limit was reached");
    assert_eq!(e.kind, ErrorKind::RateLimited);
    assert_eq!(e.code.as_deref(), Some("tokens_per_minute"));
    assert!(e.retry_after.is_some());
    assert!(
        e.headers
            .iter()
            .any(|(k, _)| k == "x-ratelimit-remaining-tokens")
    );
    // Near the limit: slices are 5 % at most, so at most three of them stay unused.
    assert!(admitted >= 10_000 - 3 * 500, "under-admitted: {admitted}");
}

/// A node renews its slice as soon as an admission leaves it low, ahead of the report of that
/// admission (reports go with the flush). A renewal smaller than what the node has charged and
/// not reported must not hand the difference to another node.
#[tokio::test]
async fn a_renewal_ahead_of_the_report_hands_no_spent_budget_to_another_node() {
    let ledger = ledger(2);
    let config = QuotaConfig {
        // No report lands during the test.
        flush_every: Duration::from_secs(3_600),
        static_share: 0.0,
        ..QuotaConfig::default()
    };
    let (a, b) = (node(&ledger, 1, config.clone()), node(&ledger, 2, config));
    let limits = tpm(400);
    // Node 1 is granted what one large request needs (100, over the 5 % cap of 20), admits it,
    // and at once renews for a slice sized to its demand (at most the cap).
    std::mem::forget(a.admit(&limits, tokens(100)).await.expect("admitted"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut admitted = 100;
    loop {
        match b.admit(&limits, tokens(20)).await {
            Ok(r) => {
                std::mem::forget(r);
                admitted += 20;
            }
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::RateLimited, "{e:?}");
                break;
            }
        }
        assert!(admitted <= 400, "over-admitted: {admitted} of 400");
    }
    while let Ok(r) = a.admit(&limits, tokens(20)).await {
        std::mem::forget(r);
        admitted += 20;
        assert!(admitted <= 400, "over-admitted: {admitted} of 400");
    }
    assert!(admitted >= 400 - 2 * 20, "under-admitted: {admitted}");
}

/// A request cut short is charged what the provider did: its prompt once the call reached the
/// provider (answered or not), and what it generated; nothing when it never got there.
#[tokio::test]
async fn a_request_cut_short_after_it_was_sent_is_charged_its_prompt() {
    let (_, q) = lone_node(QuotaConfig::default());
    let limits = tpm(10_000);
    let charged = || charged_to(&q, LimitKind::TokensPerMinute);
    // tokens(100): a prompt of 50, a reserve of 50.
    let r = q.admit(&limits, tokens(100)).await.expect("admitted");
    r.settle_partial(0, false);
    assert_eq!(charged(), Some(0), "never reached a provider: nothing");
    let r = q.admit(&limits, tokens(100)).await.expect("admitted");
    r.settle_partial(0, true);
    assert_eq!(
        charged(),
        Some(50),
        "sent, failed or left before a token: the prompt"
    );
    let r = q.admit(&limits, tokens(100)).await.expect("admitted");
    r.settle_partial(7, true);
    assert_eq!(charged(), Some(107), "and what was generated");
}

#[tokio::test]
async fn settled_reservations_give_back_what_they_did_not_use() {
    let (ledger, q) = lone_node(QuotaConfig::default());
    let limits = tpm(1_000);
    // Each reserves 400 but uses 100: seven fit, not two.
    for _ in 0..7 {
        let r = q.admit(&limits, tokens(400)).await.expect("admitted");
        assert!(
            r.rate_limits
                .iter()
                .any(|s| s.kind == LimitKind::TokensPerMinute)
        );
        finish_call(&q, &ledger, r, 60, 40);
    }
    // The eighth would need 400 with 300 left.
    let e = q.admit(&limits, tokens(400)).await.expect_err("300 left");
    assert_eq!(e.code.as_deref(), Some("tokens_per_minute"));
    q.flush().await;
    let used = ledger.published.borrow().ledger["tenant/acme/tokens_per_minute"].used;
    assert_eq!(used, 700, "the ledger holds actual usage");
    let day = day_of(ledger.clock.load(Ordering::Relaxed));
    assert_eq!(
        ledger.published.borrow().usage[&day]["acme"]
            .model("m")
            .requests,
        7,
        "roll-ups are reported with the usage"
    );
    // A request bigger than the limit can never pass.
    let e = q.admit(&limits, tokens(5_000)).await.expect_err("too big");
    assert!(e.no_retry);
}

#[tokio::test]
async fn without_quorum_limits_deny_or_share() {
    let ledger = ledger(4);
    let limits = tenant_scope(Limits {
        tokens_per_minute: Some(4_000),
        requests_per_minute: Some(400),
        ..Limits::default()
    });
    ledger.down.store(true, Ordering::Relaxed);
    let deny = node(&ledger, 1, ledger_only());
    let e = deny
        .admit(&limits, tokens(10))
        .await
        .expect_err("no slice without quorum");
    assert_eq!(e.code.as_deref(), Some("quota_unavailable"));
    assert_eq!(e.kind, ErrorKind::Unavailable);

    let mut config = ledger_only();
    config
        .no_quorum
        .insert(LimitKind::TokensPerMinute, NoQuorum::LocalShare);
    config
        .no_quorum
        .insert(LimitKind::RequestsPerMinute, NoQuorum::LocalShare);
    let share = node(&ledger, 2, config);
    let mut admitted = 0;
    for _ in 0..300 {
        if let Ok(r) = share.admit(&limits, tokens(10)).await {
            admitted += 10;
            std::mem::forget(r);
        }
    }
    // limit ÷ 4 nodes.
    assert_eq!(admitted, 1_000);
    assert!(share.no_quorum_counts().0 >= 100);
}

/// A reload's `[quota]` applies from the next admission on (here: what a limit does without
/// quorum, and the estimate of an image), but the static share the node started with stays.
#[tokio::test]
async fn a_reload_retunes_the_quota_but_keeps_its_static_share() {
    let ledger = ledger(4);
    let limits = tpm(4_000);
    ledger.down.store(true, Ordering::Relaxed);
    let mut config = ledger_only();
    config.grant_wait = Duration::from_millis(100);
    let q = node(&ledger, 1, config.clone());
    let e = q.admit(&limits, tokens(10)).await.expect_err("denied");
    assert_eq!(e.code.as_deref(), Some("quota_unavailable"));

    config
        .no_quorum
        .insert(LimitKind::TokensPerMinute, NoQuorum::LocalShare);
    config.image_tokens = 77;
    config.static_share = 0.5;
    assert!(q.retune(config), "a changed static share is reported");
    assert_eq!(q.image_tokens(), 77);
    assert_eq!(q.inner.config().static_share, 0.0, "kept until a restart");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match q.admit(&limits, tokens(10)).await {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the local share never applied: {e:?}"
            ),
        }
    }
}

#[tokio::test]
async fn a_local_share_gives_way_to_grants_once_quorum_is_back() {
    let ledger = ledger(4);
    let limits = tpm(4_000);
    let mut config = ledger_only();
    config.grant_ttl = Duration::from_millis(300);
    config
        .no_quorum
        .insert(LimitKind::TokensPerMinute, NoQuorum::LocalShare);
    ledger.down.store(true, Ordering::Relaxed);
    let q = node(&ledger, 1, config);
    let mut admitted = 0;
    let spend = async |q: &Quota, admitted: &mut u64| {
        for _ in 0..500 {
            match q.admit(&limits, tokens(10)).await {
                Ok(r) => {
                    *admitted += 10;
                    std::mem::forget(r);
                }
                Err(e) => return e,
            }
        }
        panic!("never refused");
    };
    let refused = spend(&q, &mut admitted).await;
    assert_eq!(admitted, 1_000, "limit ÷ 4 nodes without quorum");
    assert_eq!(refused.kind, ErrorKind::RateLimited);
    let retry = refused.retry_after.expect("a Retry-After");
    assert!(
        retry <= Duration::from_secs(1),
        "retry when the local share's time is up, not at the window's end: {retry:?}"
    );
    // Quorum is back: once the local share's time is up, a renewal gets a grant, and the
    // node admits beyond its local share (the ledger has the rest of the limit).
    ledger.down.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(5);
    while admitted <= 1_000 {
        assert!(Instant::now() < deadline, "still held to the local share");
        if let Ok(r) = q.admit(&limits, tokens(10)).await {
            admitted += 10;
            std::mem::forget(r);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    spend(&q, &mut admitted).await;
    assert!(
        admitted > 1_000 && admitted <= 4_000,
        "{admitted} admitted in the window"
    );
    // The ledger counted everything the node admitted, on its own without quorum included.
    q.flush().await;
    let entry = ledger.published.borrow().ledger["tenant/acme/tokens_per_minute"].clone();
    assert_eq!(entry.used_by.get(&1).copied(), Some(admitted));
}

#[tokio::test]
async fn usage_settled_after_its_window_closed_is_charged_to_the_window_now_running() {
    let (_, q) = lone_node(QuotaConfig::default());
    let scopes = tpm(100_000);
    let charged = || charged_to(&q, LimitKind::TokensPerMinute);
    let usage = |tokens: u64| Billable::plain(tokens / 2, tokens - tokens / 2);
    // Two requests of 100 tokens, admitted as if in the minute before this one (a long stream
    // that crossed the boundary): one used 900 tokens, the other 40.
    let mut long = q.admit(&scopes, tokens(100)).await.expect("admitted");
    let mut short = q.admit(&scopes, tokens(100)).await.expect("admitted");
    for r in [&mut long, &mut short] {
        for c in &mut r.entries {
            c.window_start -= 60_000;
        }
    }
    assert_eq!(charged(), Some(200));
    long.settle(&usage(900));
    assert_eq!(
        charged(),
        Some(1_000),
        "the 800 beyond its reserve count in the minute now running"
    );
    // A refund for a window that has closed gives nothing back in this one.
    short.settle(&usage(40));
    assert_eq!(charged(), Some(1_000));
}

#[tokio::test]
async fn users_features_and_cost_are_limited_each_in_their_own_scope() {
    let (_, q) = lone_node(QuotaConfig::default());
    let scopes = |user: &str| {
        vec![
            Scope {
                key: "tenant/acme".into(),
                limits: Limits {
                    cost_per_day_micro_usd: Some(10_000),
                    ..Limits::default()
                },
            },
            Scope {
                key: format!("tenant/acme/user/{user}"),
                limits: Limits {
                    requests_per_minute: Some(3),
                    ..Limits::default()
                },
            },
        ]
    };
    // $1 per million tokens in and $2 out: 100 in + 100 out = 300 µ$ a request.
    let priced = Estimate {
        prompt: 100,
        completion: 100,
        price: Some(meridian_policy::cost::Rates {
            input: 1_000_000,
            output: 2_000_000,
            ..Default::default()
        }),
    };
    for _ in 0..3 {
        std::mem::forget(q.admit(&scopes("u1"), priced).await.expect("admitted"));
    }
    let e = q
        .admit(&scopes("u1"), priced)
        .await
        .expect_err("u1 used its 3 requests");
    assert_eq!(e.code.as_deref(), Some("requests_per_minute"));
    // Another user of the same tenant is not affected, until the tenant's cost runs out.
    let mut admitted = 3;
    let err = loop {
        match q
            .admit(&scopes(&format!("u{}", admitted + 10)), priced)
            .await
        {
            Ok(r) => {
                std::mem::forget(r);
                admitted += 1;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(err.code.as_deref(), Some("cost_per_day"));
    assert_eq!(admitted, 10_000 / 300, "cost_per_day admits {admitted}");
    assert!(
        err.headers
            .iter()
            .any(|(k, _)| k == "x-ratelimit-limit-cost-day")
    );
}

#[tokio::test]
async fn a_limit_of_one_admits_exactly_one() {
    let (_, q) = lone_node(QuotaConfig::default());
    let scopes = tenant_scope(Limits {
        requests_per_minute: Some(1),
        ..Limits::default()
    });
    let first = q.admit(&scopes, tokens(10)).await;
    assert!(first.is_ok());
    let second = q.admit(&scopes, tokens(10)).await;
    assert_eq!(
        second.expect_err("one a minute").code.as_deref(),
        Some("requests_per_minute")
    );
}

#[tokio::test]
async fn a_report_whose_answer_was_lost_is_counted_once() {
    let (ledger, q) = lone_node(ledger_only());
    let r = q.admit(&tpm(10_000), tokens(100)).await.expect("admitted");
    std::mem::forget(r);
    q.flush().await; // the slice's first report
    let used = || ledger.published.borrow().ledger["tenant/acme/tokens_per_minute"].used;
    assert_eq!(used(), 100);
    let r = q.admit(&tpm(10_000), tokens(50)).await.expect("admitted");
    std::mem::forget(r);
    ledger.lose_next_ack.store(true, Ordering::Relaxed);
    q.flush().await; // committed, but the node never heard so
    assert_eq!(used(), 150);
    q.flush().await; // sent again with the same sequence number
    q.flush().await;
    assert_eq!(used(), 150, "the retried report is not counted twice");
}

#[tokio::test]
async fn a_limit_that_refuses_gives_back_what_the_others_were_charged() {
    let (_, q) = lone_node(QuotaConfig::default());
    // Tokens per minute come before tokens per day: the first admits, the second refuses.
    let scopes = tenant_scope(Limits {
        tokens_per_minute: Some(10_000),
        tokens_per_day: Some(150),
        ..Limits::default()
    });
    let charged = |kind| charged_to(&q, kind);
    let first = q.admit(&scopes, tokens(100)).await.expect("admitted");
    let err = q
        .admit(&scopes, tokens(100))
        .await
        .expect_err("over the daily limit");
    assert_eq!(err.code.as_deref(), Some("tokens_per_day"));
    assert_eq!(charged(LimitKind::TokensPerMinute), Some(100));
    assert_eq!(charged(LimitKind::TokensPerDay), Some(100));
    drop(first);
    // The first request never reached a provider: its tokens come back too.
    assert_eq!(charged(LimitKind::TokensPerMinute), Some(0));
}

#[tokio::test]
async fn a_budgets_limit_and_reset_follow_the_limit_and_the_clock() {
    let (ledger, q) = lone_node(QuotaConfig::default());
    let first = q.admit(&tpm(1_000), tokens(100)).await.unwrap();
    let state = &first.rate_limits[0];
    assert_eq!(
        (state.kind, state.limit, state.remaining),
        (LimitKind::TokensPerMinute, 1_000, 900)
    );
    let reset = state.reset;
    assert!(reset <= Duration::from_secs(60), "{reset:?}");
    // The tenant's limit is raised: the same budget now states the new one.
    let second = q.admit(&tpm(5_000), tokens(100)).await.unwrap();
    let state = &second.rate_limits[0];
    assert_eq!(
        (state.limit, state.kind),
        (5_000, LimitKind::TokensPerMinute)
    );
    assert!(state.remaining <= 4_900, "{state:?}");
    // A second later the reset is a second nearer.
    ledger.clock.fetch_add(1_100, Ordering::Relaxed);
    let third = q.admit(&tpm(5_000), tokens(100)).await.unwrap();
    let later = third.rate_limits[0].reset;
    assert!(
        whole_seconds(later) < whole_seconds(reset),
        "{later:?} vs {reset:?}"
    );
}

#[test]
fn whole_seconds_round_up() {
    for (d, want) in [
        (Duration::ZERO, 0),
        (Duration::from_secs(60), 60),
        (Duration::from_nanos(1), 1),
        (Duration::from_millis(1_200), 2),
        (Duration::from_secs(u64::MAX), u64::MAX),
        (Duration::MAX, u64::MAX),
    ] {
        assert_eq!(whole_seconds(d), want);
    }
}

#[test]
fn months_are_calendar_months_in_utc() {
    let day = 86_400_000;
    // 2024-02-10T12:00:00Z: February of a leap year, 29 days from 2024-02-01T00:00:00Z.
    let (start, len) = LimitKind::TokensPerMonth.window(1_707_566_400_000);
    assert_eq!((start, len), (1_706_745_600_000, 29 * day));
    // The last millisecond of 2024-12 and the first of 2025-01.
    let new_year = 1_735_689_600_000;
    assert_eq!(
        LimitKind::TokensPerMonth.window(new_year - 1),
        (new_year - 31 * day, 31 * day)
    );
    assert_eq!(
        LimitKind::TokensPerMonth.window(new_year),
        (new_year, 31 * day)
    );
    // April has 30 days; a window's length is found from its start.
    let april = 1_743_465_600_000; // 2025-04-01T00:00:00Z
    assert_eq!(LimitKind::TokensPerMonth.window_len(april), 30 * day);
    // Minutes and days stay aligned to the epoch.
    assert_eq!(
        LimitKind::TokensPerDay.window(new_year + 5),
        (new_year, day)
    );
    assert_eq!(LimitKind::TokensPerMinute.window(61_000), (60_000, 60_000));
}

#[test]
fn budgets_of_ended_windows_are_forgotten_once_reported() {
    let now = Instant::now();
    let minute = LimitKind::TokensPerMinute.window(0).1;
    let unix = 10 * minute + 5;
    let mut budgets = Budgets::default();
    let mut add = |user: &str, window_start: u64, charged: i64, reported: i64, renewing: bool| {
        let mut b = Budget::new(LimitKind::TokensPerMinute, 100, window_start, now);
        b.charged = charged;
        b.reported = reported;
        b.renewing = renewing;
        let key = BudgetKey::new(&format!("tenant/t/user/{user}"), LimitKind::TokensPerMinute);
        budgets.insert(key.clone(), b);
        key
    };
    add("done", 9 * minute, 40, 40, false);
    let unreported = add("unreported", 9 * minute, 40, 30, false);
    add("renewing", 9 * minute, 40, 40, true);
    add("current", 10 * minute, 40, 40, false);
    // Listed under the end of minute 9, then moved on to minute 10 (as a request in the new
    // window does): the old listing passes it over.
    let moved = add("moved", 9 * minute, 40, 40, false);
    let b = budgets.map.get_mut(&moved).expect("there");
    b.window_start = 10 * minute;
    Budgets::list_end(&mut budgets.ends, &moved, 10 * minute);
    let left = |budgets: &Budgets| {
        let mut left: Vec<String> = budgets.map.keys().map(|k| k.scope.to_string()).collect();
        left.sort();
        left
    };
    budgets.forget_ended(unix);
    assert_eq!(
        left(&budgets),
        [
            "tenant/t/user/current",
            "tenant/t/user/moved",
            "tenant/t/user/renewing",
            "tenant/t/user/unreported"
        ]
    );
    // Once its charge is reported, the budget left behind goes on a later pass.
    budgets.map.get_mut(&unreported).expect("there").reported = 40;
    budgets.forget_ended(unix);
    assert_eq!(
        left(&budgets).len(),
        4,
        "not looked at again before its retry"
    );
    budgets.forget_ended(unix + 1_000);
    assert_eq!(
        left(&budgets),
        [
            "tenant/t/user/current",
            "tenant/t/user/moved",
            "tenant/t/user/renewing"
        ]
    );
}

#[test]
fn a_flush_looks_only_at_budgets_touched_since_the_last() {
    let now = Instant::now();
    let mut budgets = Budgets::default();
    let keys: Vec<BudgetKey> = (0..1_000)
        .map(|u| {
            let key = BudgetKey::new(&format!("tenant/t/user/{u}"), LimitKind::TokensPerDay);
            let mut b = Budget::new(LimitKind::TokensPerDay, 100, 0, now);
            b.charged = 10;
            budgets.insert(key.clone(), b);
            key
        })
        .collect();
    let sent = budgets.unreported(|_| true);
    assert_eq!(sent.len(), 1_000, "every new budget is reported once");
    for (key, _, delta, _) in sent {
        budgets.map.get_mut(&key).expect("there").reported += delta;
    }
    assert!(
        budgets.unreported(|_| true).is_empty(),
        "nothing touched since"
    );
    assert!(budgets.touched.is_empty());
    // Two charges to one budget and one to another: two budgets to look at, each once.
    for key in [&keys[7], &keys[7], &keys[300]] {
        budgets.map.get_mut(key).expect("there").charged += 5;
        budgets.touch(key);
    }
    assert_eq!(budgets.touched.len(), 2);
    // One fits this flush; the other stays touched for the next.
    let mut room = 1;
    let first = budgets.unreported(|_| std::mem::take(&mut room) == 1);
    assert_eq!(first.len(), 1);
    let second = budgets.unreported(|_| true);
    assert_eq!(second.len(), 1);
    assert_ne!(first[0].0, second[0].0, "each budget reported once");
    assert_eq!(first[0].2 + second[0].2, 15, "every charge, once");
}

#[tokio::test]
async fn a_flush_of_any_size_goes_in_batches_that_fit_one_raft_entry() {
    let config = QuotaConfig {
        flush_every: Duration::from_secs(3_600),
        ..QuotaConfig::default()
    };
    let q = node(&ledger(1), 1, config);
    // Let the flusher's first (immediate) tick pass before there is anything to flush.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let now = Instant::now();
    let window = LimitKind::TokensPerDay
        .window(q.inner.config().clock.now_ms())
        .0;
    let users = 20_000;
    {
        let mut budgets = lock(&q.inner.budgets);
        for u in 0..users {
            let mut b = Budget::new(LimitKind::TokensPerDay, 10_000, window, now);
            b.charged = 5;
            budgets.insert(
                BudgetKey::new(
                    &format!("tenant/acme/user/a-rather-long-end-user-id-{u:08}"),
                    LimitKind::TokensPerDay,
                ),
                b,
            );
        }
        let mut rollups = lock(&q.inner.rollups);
        // Over two days (the flush goes day by day), with the longest day numbers there are,
        // as the longest counts below.
        for t in 0..2_000u64 {
            let models = rollups
                .entry(u64::MAX - t % 2)
                .or_default()
                .entry(format!("tenant-{t}").into())
                .or_default();
            for m in ["llama-3.1-8b-instruct", "gpt-4o-mini"] {
                models.insert(
                    UsageKey {
                        model: m.to_owned(),
                        provider: "vllm-pool-eu-west".to_owned(),
                        feature: "document-summaries".to_owned(),
                        user: format!("a-rather-long-end-user-id-{t:08}"),
                    },
                    UsageTotals {
                        requests: u64::MAX,
                        prompt_tokens: u64::MAX,
                        completion_tokens: u64::MAX,
                        cached_tokens: u64::MAX,
                        cost_micro_usd: u64::MAX,
                        cache_hits: u64::MAX,
                    },
                );
            }
        }
    }
    let (mut reports, mut rollups, mut batches) = (0, 0, 0);
    while let Some(batch) = q.next_batch() {
        batches += 1;
        let entry = Command::Once {
            node: u64::MAX,
            seq: u64::MAX,
            command: Box::new(Command::Batch {
                commands: batch.commands.clone(),
            }),
        };
        let bytes = serde_json::to_vec(&entry).expect("encodes").len();
        assert!(
            bytes <= MAX_FLUSH_BYTES,
            "batch {batches} encodes to {bytes} bytes"
        );
        for c in &batch.commands {
            match c {
                Command::ReportUsage { .. } => reports += 1,
                Command::RecordUsage { day, .. } => {
                    // The earlier day's rows go first.
                    assert!(
                        *day == Some(u64::MAX - 1) || rollups >= 2_000,
                        "a row of the later day before all of the earlier"
                    );
                    rollups += 1;
                }
                other => panic!("not a usage command: {other:?}"),
            }
        }
        // As a committed flush does.
        let mut budgets = lock(&q.inner.budgets);
        for (key, _, delta) in batch.sent {
            if let Some(b) = budgets.map.get_mut(&key) {
                b.reported += delta;
            }
        }
    }
    println!("{users} reports and 4,000 roll-ups went in {batches} batches");
    assert!(batches > 1, "that much does not fit one entry");
    assert_eq!((reports, rollups), (users, 4_000), "everything went, once");
    assert!(lock(&q.inner.rollups).is_empty(), "no day is left behind");
}

fn user_scope(user: u64, tokens_per_minute: u64) -> Vec<Scope> {
    vec![Scope {
        key: format!("tenant/acme/user/u{user}"),
        limits: tpm_limits(tokens_per_minute),
    }]
}

#[tokio::test]
async fn a_new_users_first_requests_take_no_raft_round_trip_and_leave_no_ledger_entry() {
    let (ledger, nodes) = cluster(3);
    // Let each flusher's first tick pass, so that every proposal counted below is one the
    // admissions caused.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = ledger.grants_and_reports.load(Ordering::Relaxed);
    for user in 0..1_000 {
        // 3 × 100 tokens of a 3,000/min limit: within this node's share (3,000 × 0.5 / 3).
        for _ in 0..3 {
            let r = nodes[user as usize % 3]
                .admit(&user_scope(user, 3_000), tokens(100))
                .await
                .expect("admitted from the share");
            r.settle(&Billable::plain(0, 90));
        }
    }
    for n in &nodes {
        n.flush().await;
    }
    assert_eq!(
        ledger.grants_and_reports.load(Ordering::Relaxed) - before,
        0,
        "no grant and no report for users within their share"
    );
    assert!(
        ledger.published.borrow().ledger.is_empty(),
        "the ledger did not grow"
    );
}

#[tokio::test]
async fn a_user_hot_on_one_node_gets_its_whole_limit_and_never_more() {
    let (ledger, nodes) = cluster(3);
    // The other nodes have seen this user a little (they hold shares with some use).
    for n in &nodes[1..] {
        std::mem::forget(
            n.admit(&user_scope(7, 3_000), tokens(100))
                .await
                .expect("admitted"),
        );
    }
    let mut admitted = 200;
    let mut refusals = Vec::new();
    // As a client does: on a 429, again after its Retry-After (the first one comes when the
    // pool is spent, while the other nodes are asked for their shares).
    while refusals.len() < 3 {
        let user = user_scope(7, 3_000);
        match nodes[0].admit(&user, tokens(100)).await {
            Ok(r) => {
                admitted += 100;
                std::mem::forget(r);
            }
            Err(e) => {
                let wait = e.retry_after.expect("a retry-after");
                refusals.push(e);
                if wait > Duration::from_secs(1) {
                    break;
                }
                tokio::time::sleep(wait + Duration::from_millis(100)).await;
            }
        }
    }
    let e = refusals.pop().expect("the limit was reached");
    assert_eq!(e.code.as_deref(), Some("tokens_per_minute"));
    let ledger_entry =
        ledger.published.borrow().ledger["tenant/acme/user/u7/tokens_per_minute"].clone();
    println!(
        "hot on one node: {admitted} of 3,000 admitted; shares released by {:?}",
        ledger_entry.released
    );
    assert!(admitted <= 3_000, "over-admitted: {admitted}");
    // Beyond its share and the pool, the others' shares were released to it on request.
    assert!(admitted >= 2_900, "under-admitted: {admitted}");
    assert_eq!(ledger_entry.released.len(), 3, "every share was released");
}

#[tokio::test]
async fn with_static_shares_a_node_without_quorum_still_admits_its_share() {
    let ledger = ledger(4);
    ledger.down.store(true, Ordering::Relaxed);
    let q = node(&ledger, 1, QuotaConfig::default());
    let mut admitted = 0;
    for _ in 0..100 {
        match q.admit(&tpm(4_000), tokens(10)).await {
            Ok(r) => {
                admitted += 10;
                std::mem::forget(r);
            }
            Err(e) => {
                assert_eq!(e.code.as_deref(), Some("quota_unavailable"));
                break;
            }
        }
    }
    // 4,000 × 0.5 ÷ 4 nodes.
    assert_eq!(admitted, 500);
}

#[tokio::test]
async fn share_counts_survive_a_clean_restart_and_a_crash_counts_the_share_as_spent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || QuotaConfig {
        state_dir: Some(dir.path().to_path_buf()),
        ..QuotaConfig::default()
    };
    // Without quorum, only this node's share (4,000 × 0.5 ÷ 4 = 500) can be admitted.
    let ledger = ledger(4);
    ledger.down.store(true, Ordering::Relaxed);
    let first = node(&ledger, 1, config());
    for _ in 0..30 {
        std::mem::forget(
            first
                .admit(&tpm(4_000), tokens(10))
                .await
                .expect("from the share"),
        );
    }
    first.save_shares(); // a clean stop
    let second = node(&ledger, 1, config());
    assert_eq!(
        admit_until_refused(&second, 4_000, 10).await,
        200,
        "the restarted node goes on from the 300 it had admitted"
    );
    // A crash: nothing saved, the running marker left behind.
    let third = node(&ledger, 1, config());
    assert_eq!(
        admit_until_refused(&third, 4_000, 10).await,
        0,
        "after a crash the window's share counts as spent"
    );
}

#[tokio::test]
async fn a_grant_asked_for_while_a_share_is_open_counts_what_the_share_admitted() {
    let ledger = ledger(3);
    let q = node(&ledger, 1, QuotaConfig::default());
    for _ in 0..4 {
        std::mem::forget(
            q.admit(&tpm(3_000), tokens(100))
                .await
                .expect("from the share"),
        );
    }
    // However a renewal comes about while the share is open (early, or for want of quorum),
    // it gives the share up with its use: the 400 admitted are counted, never lost.
    q.renew(BudgetKey::new("tenant/acme", LimitKind::TokensPerMinute))
        .await;
    let state = ledger.published.borrow().clone();
    let entry = &state.ledger["tenant/acme/tokens_per_minute"];
    assert_eq!(entry.released.get(&1), Some(&400));
    assert_eq!(entry.used, 400);
    let more = admit_until_refused(&q, 3_000, 100).await;
    assert!(
        400 + more == 3_000 - 2 * 500,
        "the other shares stay set aside: {more}"
    );
}

/// Admits `each`-token requests of `tpm(limit)` until one is refused; returns what was
/// admitted.
async fn admit_until_refused(q: &Quota, limit: u64, each: u64) -> u64 {
    let mut admitted = 0;
    while let Ok(r) = q.admit(&tpm(limit), tokens(each)).await {
        admitted += each;
        std::mem::forget(r);
        assert!(admitted <= limit, "runaway");
    }
    admitted
}

#[tokio::test]
async fn a_node_that_has_not_seen_every_voter_register_takes_no_larger_share() {
    // Only this node is in the member table yet; the cluster is configured with three voters.
    let ledger = ledger(1);
    ledger.down.store(true, Ordering::Relaxed);
    let q = node(
        &ledger,
        1,
        QuotaConfig {
            min_nodes: 3,
            ..QuotaConfig::default()
        },
    );
    // 3,000 × 0.5 ÷ 3, not ÷ 1.
    assert_eq!(admit_until_refused(&q, 3_000, 100).await, 500);
}

/// Node 1 of `ledger`, every scope through the ledger, whose flusher waits an hour: the test
/// flushes.
fn flushed_by_hand(ledger: &Arc<Ledger>) -> Quota {
    node(
        ledger,
        1,
        QuotaConfig {
            flush_every: Duration::from_secs(3_600),
            ..ledger_only()
        },
    )
}

#[tokio::test]
async fn a_clean_stop_reports_what_the_last_interval_charged() {
    let ledger = ledger(1);
    let q = flushed_by_hand(&ledger);
    tokio::time::sleep(Duration::from_millis(20)).await; // the flusher's first tick
    let r = q.admit(&tpm(10_000), tokens(100)).await.expect("admitted");
    finish_call(&q, &ledger, r, 20, 60);
    q.flush_before_stop(Duration::from_secs(2)).await;
    let state = ledger.published.borrow().clone();
    assert_eq!(state.ledger["tenant/acme/tokens_per_minute"].used, 80);
    assert_eq!(
        state.usage.values().next().expect("a day")["acme"]
            .model("m")
            .completion_tokens,
        60
    );
}

#[test]
fn a_roll_up_command_encodes_within_its_size_estimate() {
    let most = u64::MAX;
    let command = Command::RecordUsage {
        tenant: String::new(),
        model: String::new(),
        totals: UsageTotals {
            requests: most,
            prompt_tokens: most,
            completion_tokens: most,
            cached_tokens: most,
            cost_micro_usd: most,
            cache_hits: most,
        },
        retain_days: most,
        provider: String::new(),
        feature: String::new(),
        user: String::new(),
        max_users: most,
        day: Some(most),
    };
    let bytes = serde_json::to_vec(&command).expect("encodes").len();
    assert!(
        bytes <= super::sync::ROLLUP_BYTES,
        "{bytes} bytes, over the estimate of {}",
        super::sync::ROLLUP_BYTES
    );
}

#[tokio::test]
async fn a_call_is_rolled_up_in_its_own_day_when_its_flush_commits_the_next() {
    let ledger = ledger(1);
    let q = flushed_by_hand(&ledger);
    let day = day_of(ledger.clock.load(Ordering::Relaxed));
    record_call(&q, day, 20, 60);
    // The flush is proposed after midnight.
    ledger
        .clock
        .store((day + 1) * 86_400_000 + 10, Ordering::Relaxed);
    q.flush().await;
    let state = ledger.published.borrow().clone();
    assert_eq!(state.usage[&day]["acme"].model("m").completion_tokens, 60);
    assert!(!state.usage.contains_key(&(day + 1)), "{:?}", state.usage);
}

/// `command` applied as node `proposer` proposed it, and published (a node that is not
/// running here).
fn propose_as(ledger: &Ledger, proposer: NodeId, command: Command) {
    let mut s = lock(&ledger.state);
    s.apply(&Proposal {
        at_unix_ms: ledger.clock.load(Ordering::Relaxed),
        proposer,
        command,
    });
    ledger.published.send_replace(Arc::new(s.clone()));
}

/// Lets the node's background tasks run until they wait on something (one runtime thread).
async fn settle() {
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
}

/// A share wanted again while this node's release of it is under way starts no second release;
/// when that release fails, the key is looked at again at the next change to the state (one
/// that marks nothing), and the share is released then.
#[tokio::test]
async fn a_share_wanted_while_its_release_is_under_way_is_released_after_that_one_fails() {
    let ledger = ledger(3);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *lock(&ledger.release_gate) = Some(Arc::clone(&gate));
    ledger.fail_next_release.store(true, Ordering::Relaxed);
    let _node_2 = node(
        &ledger,
        2,
        QuotaConfig {
            flush_every: Duration::from_secs(3_600),
            ..QuotaConfig::default()
        },
    );
    settle().await;
    let key = "tenant/acme/tokens_per_minute";
    let now = ledger.clock.load(Ordering::Relaxed);
    // Node 1 gives up its share (500 of 3,000 over three nodes) and asks for more than the
    // ledger has to give while the other two hold theirs: the entry is marked wanted.
    let ask = || {
        Command::RequestGrant(GrantRequest {
            key: key.into(),
            node: 1,
            limit: 3_000,
            window_ms: 60_000,
            window_start_unix_ms: now / 60_000 * 60_000,
            amount: 3_000,
            ttl_ms: 10_000,
            share: 500,
            share_nodes: 3,
            share_used: 0,
            charged: 0,
        })
    };
    let released_by_2 = || {
        ledger.published.borrow().ledger[key]
            .released
            .contains_key(&2)
    };
    let proposed = || ledger.releases_proposed.load(Ordering::Relaxed);
    propose_as(&ledger, 1, ask());
    settle().await;
    assert_eq!(proposed(), 1, "node 2 started giving up its share");
    // Marked again while that release waits: no second one starts.
    propose_as(&ledger, 1, ask());
    settle().await;
    assert_eq!(
        proposed(),
        1,
        "a second release while the first is under way"
    );
    // The first release fails (its proposal is lost).
    *lock(&ledger.release_gate) = None;
    gate.add_permits(1);
    settle().await;
    assert!(!released_by_2(), "the failed release was not applied");
    assert_eq!(proposed(), 1);
    // A change that marks nothing: node 2 looks at the key it missed again, and releases.
    propose_as(&ledger, 1, Command::RevokeApiKey { id: "none".into() });
    settle().await;
    assert_eq!(proposed(), 2, "the missed key was looked at again");
    assert!(released_by_2(), "node 2's share is released");
}
