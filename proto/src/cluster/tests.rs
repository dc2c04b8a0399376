use super::*;

fn proposal(at: u64, command: Command) -> Proposal {
    Proposal {
        at_unix_ms: at,
        proposer: 1,
        command,
    }
}

fn provider(id: &str) -> ProviderRecord {
    ProviderRecord {
        id: id.into(),
        kind: "openai".into(),
        region: "eu".into(),
        reach: Reach::Direct("http://10.0.0.1:8000/v1".into()),
        models: vec!["llama".into()],
        owner: 1,
        weight: 1,
        max_concurrency: 64,
        price: ProviderPrice::default(),
        replica: false,
        updated_at_unix_ms: 0,
        default_max_tokens: 0,
        api_key: String::new(),
    }
}

#[test]
fn apply_is_deterministic_and_idempotent_for_repeats() {
    let log = [
        proposal(10, Command::UpsertProvider(provider("a"))),
        proposal(20, Command::UpsertProvider(provider("a"))),
        proposal(
            30,
            Command::UpsertMember(Member {
                id: 2,
                region: "eu".into(),
                raft_addr: "127.0.0.2:7000".into(),
                http_addr: "127.0.0.2:8080".into(),
                mesh_addr: String::new(),
                started_unix_ms: 0,
                snapshot_format: 0,
            }),
        ),
        proposal(40, Command::RemoveProvider { id: "zzz".into() }),
        proposal(50, Command::RemoveMember { id: 2 }),
    ];
    let run = || {
        let mut s = ClusterState::default();
        let outcomes: Vec<Applied> = log.iter().map(|p| s.apply(p)).collect();
        (s, outcomes)
    };
    let (a, outcomes) = run();
    assert_eq!(
        outcomes,
        [
            Applied::Changed,
            Applied::Unchanged,
            Applied::Changed,
            Applied::NotFound,
            Applied::Changed
        ]
    );
    assert_eq!(a, run().0, "the same log gives the same state");
    assert_eq!(
        a.providers["a"].updated_at_unix_ms, 10,
        "time comes from the proposal"
    );
    assert!(a.members.is_empty());
    let round_trip: ClusterState =
        serde_json::from_slice(&serde_json::to_vec(&a).expect("encode")).expect("decode");
    assert_eq!(round_trip, a);
}

fn grant_in(node: NodeId, window: u64, amount: u64, ttl_ms: u64) -> Command {
    Command::RequestGrant(GrantRequest {
        key: "tenant/acme/tokens_per_minute".into(),
        node,
        limit: 1_000,
        window_ms: 60_000,
        window_start_unix_ms: window,
        amount,
        ttl_ms,
        ..GrantRequest::default()
    })
}

fn grant(node: NodeId, amount: u64, ttl_ms: u64) -> Command {
    grant_in(node, 120_000, amount, ttl_ms)
}

fn usage(node: NodeId, window_start_unix_ms: u64, delta: i64) -> Command {
    Command::ReportUsage {
        key: "tenant/acme/tokens_per_minute".into(),
        node,
        window_start_unix_ms,
        delta,
        limit: 1_000,
        window_ms: 60_000,
    }
}

#[test]
fn usage_on_a_key_with_no_entry_makes_one_unless_its_window_is_over() {
    let mut s = ClusterState::default();
    let report = |limit: u64, window_start_unix_ms: u64| Command::ReportUsage {
        key: "tenant/acme/tokens_per_minute".into(),
        node: 2,
        window_start_unix_ms,
        delta: 300,
        limit,
        window_ms: 60_000,
    };
    // A report of before `limit` and `window_ms` were sent makes nothing.
    assert_eq!(
        s.apply(&proposal(130_000, report(0, 120_000))),
        Applied::NotFound
    );
    // A window long over makes nothing.
    let long_ago = 130_000 + LEDGER_GRACE_MS;
    assert_eq!(
        s.apply(&proposal(long_ago + 60_000, report(1_000, 120_000))),
        Applied::NotFound
    );
    assert!(s.ledger.is_empty());
    // Usage a node admitted on its own (no quorum, so no grant) is counted.
    assert_eq!(
        s.apply(&proposal(130_000, report(1_000, 120_000))),
        Applied::Changed
    );
    let entry = &s.ledger["tenant/acme/tokens_per_minute"];
    assert_eq!(
        (entry.limit, entry.used, entry.window_ms),
        (1_000, 300, 60_000)
    );
    assert_eq!(entry.used_by.get(&2), Some(&300));
    // A grant in the window then comes from what is left.
    let Applied::Granted { used, .. } =
        s.apply(&proposal(131_000, grant_in(2, 120_000, 100, 5_000)))
    else {
        panic!("a grant");
    };
    assert_eq!(
        used, 300,
        "the node's reported usage comes back with its grant"
    );
}

#[test]
fn ended_windows_leave_the_ledger_and_their_grants_are_not_remade() {
    let mut s = ClusterState::default();
    let per_user = |user: u64, window: u64| {
        Command::RequestGrant(GrantRequest {
            key: format!("tenant/acme/user/u{user}/tokens_per_minute"),
            node: 1,
            limit: 1_000,
            window_ms: 60_000,
            window_start_unix_ms: window,
            amount: 10,
            ttl_ms: 5_000,
            ..GrantRequest::default()
        })
    };
    // 1,000 users in the minute starting at 120 s.
    for user in 0..1_000 {
        s.apply(&proposal(120_001 + user, per_user(user, 120_000)));
    }
    assert_eq!(s.ledger.len(), 1_000);
    // Their grants lapse at ~125 s; the minute ends at 180 s, the grace at 300 s. Steady
    // traffic of one other user goes on through the sweep.
    let mut at = 130_000;
    while at < 300_000 {
        s.apply(&proposal(at, per_user(5_000, at - at % 60_000)));
        at += 1_000;
    }
    assert!(
        s.ledger
            .values()
            .all(|l| l.grants.values().all(|g| g.expires_at_unix_ms > at - 1_000)),
        "lapsed grants are dropped by the sweep"
    );
    for _ in 0..(1_000 / SWEEP_PER_APPLY + 2) {
        s.apply(&proposal(at, per_user(5_000, at - at % 60_000)));
        at += 1;
    }
    assert_eq!(
        s.ledger.keys().map(|k| &**k).collect::<Vec<_>>(),
        ["tenant/acme/user/u5000/tokens_per_minute"],
        "every ended window is gone, the live one stays"
    );
    // A late request for the long-gone window is granted nothing and makes no entry.
    assert_eq!(
        s.apply(&proposal(at, per_user(1, 120_000))),
        Applied::Granted {
            amount: 0,
            used: 0,
            held: 0,
        }
    );
    assert_eq!(s.ledger.len(), 1);
}

#[test]
fn a_clone_of_the_state_shares_its_tables_and_a_write_copies_only_its_path() {
    let mut s = ClusterState::default();
    for user in 0..10_000u64 {
        s.apply(&proposal(
            120_001,
            Command::RequestGrant(GrantRequest {
                key: format!("tenant/acme/user/u{user}/tokens_per_day"),
                node: 1,
                limit: 1_000,
                window_ms: 86_400_000,
                window_start_unix_ms: 0,
                amount: 10,
                ttl_ms: 5_000,
                ..GrantRequest::default()
            }),
        ));
    }
    let published = s.clone();
    assert!(
        published.ledger.ptr_eq(&s.ledger),
        "a clone shares the table"
    );
    s.apply(&proposal(120_002, grant(1, 5, 5_000)));
    assert!(
        !published.ledger.ptr_eq(&s.ledger),
        "the writer got its own root"
    );
    assert_eq!(
        published.ledger.len(),
        10_000,
        "what was published stays as it was"
    );
    assert_eq!(s.ledger.len(), 10_001);
}

/// A node asks again for a slice before its reports of the last one land (a renewal goes out as
/// soon as the slice runs low, the report with the next flush). What it was promised stays
/// held for it, so the budget it has already spent is never granted to another node.
#[test]
fn a_renewal_ahead_of_its_reports_hands_nothing_spent_to_another_node() {
    let mut s = ClusterState::default();
    let t0 = 120_000;
    let with_charged = |node, amount, charged| match grant(node, amount, 10_000) {
        Command::RequestGrant(r) => Command::RequestGrant(GrantRequest { charged, ..r }),
        _ => unreachable!(),
    };
    s.apply(&proposal(t0 + 1, grant(1, 600, 10_000)));
    // Node 1 admits all 600, unreported, and asks for a small slice more.
    assert_eq!(
        s.apply(&proposal(t0 + 2, with_charged(1, 100, 600))),
        Applied::Granted {
            amount: 100,
            used: 0,
            held: 600,
        }
    );
    assert_eq!(
        s.apply(&proposal(t0 + 3, grant(2, 1_000, 10_000))),
        Applied::Granted {
            amount: 300,
            used: 0,
            held: 0,
        },
        "only what node 1 neither spent nor was promised"
    );
    // Its report lands: what was held for it is counted as used, nothing is freed twice.
    s.apply(&proposal(t0 + 4, usage(1, t0, 600)));
    let ledger = &s.ledger["tenant/acme/tokens_per_minute"];
    assert_eq!((ledger.used, ledger.available()), (600, 0));

    // A grant that lapsed with its node's reports still on their way: the node's word for
    // what it charged is held for it before anything new.
    let t1 = t0 + 60_000;
    let next = |node, amount, charged, at| match grant_in(node, t1, amount, 1_000) {
        Command::RequestGrant(r) => {
            proposal(at, Command::RequestGrant(GrantRequest { charged, ..r }))
        }
        _ => unreachable!(),
    };
    s.apply(&next(1, 500, 0, t1 + 1));
    assert_eq!(
        s.apply(&next(1, 100, 500, t1 + 2_000)),
        Applied::Granted {
            amount: 100,
            used: 0,
            held: 500,
        }
    );
    assert_eq!(s.ledger["tenant/acme/tokens_per_minute"].available(), 400);
}

#[test]
fn grants_never_promise_more_than_the_window_has_left() {
    let mut s = ClusterState::default();
    let t0 = 120_000; // a window boundary
    assert_eq!(
        s.apply(&proposal(t0 + 1, grant(1, 600, 10_000))),
        Applied::Granted {
            amount: 600,
            used: 0,
            held: 0,
        }
    );
    assert_eq!(
        s.apply(&proposal(t0 + 2, grant(2, 600, 10_000))),
        Applied::Granted {
            amount: 400,
            used: 0,
            held: 0,
        },
        "only what node 1 was not promised"
    );
    // Node 1 reported 100 of its 600 and asks again: the 500 it was promised and did not
    // report stay with it, and nothing is left for a new slice.
    assert_eq!(
        s.apply(&proposal(t0 + 3, usage(1, t0, 100))),
        Applied::Changed
    );
    assert_eq!(
        s.apply(&proposal(t0 + 4, grant(1, 1_000, 10_000))),
        Applied::Granted {
            amount: 0,
            used: 100,
            held: 500,
        },
        "node 1 may charge what it reported plus what was held for it"
    );
    let ledger = &s.ledger["tenant/acme/tokens_per_minute"];
    assert_eq!((ledger.used, ledger.available()), (100, 0));
    // Node 2 dies: its grant lapses after its ttl and the budget is free again.
    assert_eq!(
        s.apply(&proposal(t0 + 10_003, grant(1, 1_000, 10_000))),
        Applied::Granted {
            amount: 400,
            used: 100,
            held: 500,
        }
    );
    // A settled reservation gives back what was not used.
    assert_eq!(
        s.apply(&proposal(t0 + 10_004, usage(1, t0, -40))),
        Applied::Changed
    );
    assert_eq!(s.ledger["tenant/acme/tokens_per_minute"].used, 60);
    // The next window: a request for it rolls the ledger; usage for the old one is dropped,
    // and a late grant request for the old window gets nothing.
    assert_eq!(
        s.apply(&proposal(t0 + 60_000, grant_in(2, t0 + 60_000, 10, 10_000))),
        Applied::Granted {
            amount: 10,
            used: 0,
            held: 0,
        }
    );
    assert_eq!(
        s.apply(&proposal(t0 + 60_001, usage(1, t0, 50))),
        Applied::Unchanged
    );
    assert_eq!(
        s.apply(&proposal(t0 + 60_002, grant_in(1, t0, 10, 10_000))),
        Applied::Granted {
            amount: 0,
            used: 0,
            held: 0,
        }
    );
    let ledger = &s.ledger["tenant/acme/tokens_per_minute"];
    assert_eq!(ledger.window_start_unix_ms, t0 + 60_000);
    assert_eq!((ledger.used, ledger.available()), (0, 990));
}

#[test]
fn tenants_need_a_tier_and_their_keys_die_with_them() {
    let mut s = ClusterState::default();
    let tenant = Tenant {
        id: "acme".into(),
        tier: "pro".into(),
        overrides: Limits {
            tokens_per_day: Some(5),
            ..Limits::default()
        },
        ..Tenant::default()
    };
    assert_eq!(
        s.apply(&proposal(1, Command::UpsertTenant(tenant.clone()))),
        Applied::NotFound
    );
    let tier = Tier {
        name: "pro".into(),
        limits: Limits {
            tokens_per_day: Some(1_000_000),
            requests_per_minute: Some(600),
            ..Limits::default()
        },
        ..Tier::default()
    };
    assert_eq!(
        s.apply(&proposal(2, Command::UpsertTier(tier))),
        Applied::Changed
    );
    assert_eq!(
        s.apply(&proposal(3, Command::UpsertTenant(tenant.clone()))),
        Applied::Changed
    );
    assert_eq!(
        s.apply(&proposal(4, Command::UpsertTenant(tenant))),
        Applied::Unchanged
    );
    let limits = s.limits_of("acme").expect("tenant exists");
    assert_eq!(limits.tokens_per_day, Some(5), "the override wins");
    assert_eq!(limits.requests_per_minute, Some(600), "the tier fills in");

    let key = ApiKeyRecord {
        id: "mk_1".into(),
        tenant: "acme".into(),
        sha256_hex: "ab".repeat(32),
        label: String::new(),
        created_at_unix_ms: 0,
        revoked_at_unix_ms: None,
    };
    assert_eq!(
        s.apply(&proposal(5, Command::CreateApiKey(key.clone()))),
        Applied::Changed
    );
    assert_eq!(
        s.apply(&proposal(6, Command::CreateApiKey(key))),
        Applied::Unchanged,
        "a key id is never reused"
    );
    assert_eq!(
        s.apply(&proposal(7, Command::RemoveTenant { id: "acme".into() })),
        Applied::Changed
    );
    assert_eq!(s.api_keys["mk_1"].revoked_at_unix_ms, Some(7));
    assert_eq!(
        s.apply(&proposal(8, Command::RevokeApiKey { id: "mk_1".into() })),
        Applied::Unchanged
    );
}

/// A roll-up of one call of `tenant`'s `user` on `model` through `provider` for `feature`.
fn rollup(tenant: &str, key: [&str; 4], totals: UsageTotals, max_users: u64) -> Command {
    let [model, provider, feature, user] = key.map(str::to_owned);
    Command::RecordUsage {
        tenant: tenant.into(),
        model,
        totals,
        retain_days: DEFAULT_RETAIN_DAYS,
        provider,
        feature,
        user,
        max_users,
        day: None,
    }
}

/// A roll-up of one call of `acme` on `llama` with `tokens` prompt tokens.
fn acme_on_llama(tokens: u64) -> Command {
    rollup(
        "acme",
        ["llama", "", "", ""],
        UsageTotals {
            requests: 1,
            prompt_tokens: tokens,
            ..UsageTotals::default()
        },
        DEFAULT_MAX_USERS,
    )
}

#[test]
fn a_roll_up_counts_in_its_calls_day_never_a_later_one_than_its_proposal() {
    let mut s = ClusterState::default();
    let on = |day: Option<u64>, tokens| {
        let mut c = acme_on_llama(tokens);
        if let Command::RecordUsage { day: d, .. } = &mut c {
            *d = day;
        }
        c
    };
    // Flushed just after midnight: the calls of the day before count there.
    s.apply(&proposal(DAY_MS * 11 + 20, on(Some(10), 3)));
    // No day (an older node): the proposal's. A day after the proposal's: the proposal's.
    s.apply(&proposal(DAY_MS * 11 + 30, on(None, 4)));
    s.apply(&proposal(DAY_MS * 11 + 40, on(Some(12), 5)));
    assert_eq!(s.usage[&10]["acme"].model("llama").prompt_tokens, 3);
    assert_eq!(s.usage[&11]["acme"].model("llama").prompt_tokens, 9);
    assert!(!s.usage.contains_key(&12));
    // A row of a day past the retention (counted back from the proposal's day) is not kept.
    let late = proposal(DAY_MS * (11 + DEFAULT_RETAIN_DAYS) + 50, on(Some(10), 7));
    assert_eq!(s.apply(&late), Applied::Unchanged);
    assert_eq!(s.usage[&10]["acme"].model("llama").prompt_tokens, 3);
    // No day is written for none, so what an older node writes and reads is unchanged (it
    // reads a command by its fields' names); a day goes and comes back.
    let none = serde_json::to_string(&on(None, 1)).expect("encodes");
    assert!(!none.contains("\"day\""), "{none}");
    let back: Command = serde_json::from_str(&none).expect("decodes");
    assert!(matches!(back, Command::RecordUsage { day: None, .. }));
    let some = serde_json::to_string(&on(Some(10), 1)).expect("encodes");
    let back: Command = serde_json::from_str(&some).expect("decodes");
    assert!(matches!(back, Command::RecordUsage { day: Some(10), .. }));
}

#[test]
fn usage_rolls_up_by_day_and_old_days_are_dropped() {
    let mut s = ClusterState::default();
    let record = acme_on_llama;
    s.apply(&proposal(DAY_MS * 10 + 5, record(3)));
    s.apply(&proposal(
        DAY_MS * 10 + 9,
        Command::Batch {
            commands: vec![record(4), record(5)],
        },
    ));
    assert_eq!(s.usage[&10]["acme"].model("llama").prompt_tokens, 12);
    let batch = Command::Batch {
        commands: vec![record(1), grant(1, 5, 5)],
    };
    let json = serde_json::to_vec(&batch).expect("a batch encodes");
    assert_eq!(
        serde_json::from_slice::<Command>(&json).expect("and decodes"),
        batch
    );
    assert_eq!(s.usage[&10]["acme"].model("llama").requests, 3);
    s.apply(&proposal(DAY_MS * (10 + DEFAULT_RETAIN_DAYS), record(1)));
    assert!(!s.usage.contains_key(&10), "day 10 is past the retention");
    assert_eq!(s.usage.len(), 1);
    let mut short = record(0);
    if let Command::RecordUsage { retain_days, .. } = &mut short {
        *retain_days = 1;
    }
    s.apply(&proposal(DAY_MS * (11 + DEFAULT_RETAIN_DAYS), short));
    assert_eq!(
        s.usage.keys().copied().collect::<Vec<_>>(),
        [11 + DEFAULT_RETAIN_DAYS],
        "a shorter retention drops every older day"
    );
}

#[test]
fn reports_sum_roll_ups_by_any_dimension_and_cap_users_per_day() {
    let mut s = ClusterState::default();
    let cost = |micro: u64| UsageTotals {
        requests: 1,
        prompt_tokens: 10,
        completion_tokens: 5,
        cost_micro_usd: micro,
        ..UsageTotals::default()
    };
    let day = |d: u64| DAY_MS * d + 1;
    for (d, tenant, key, micro) in [
        (20, "acme", ["llama", "vllm-a", "search", "u1"], 300),
        (20, "acme", ["llama", "vllm-b", "chat", "u2"], 200),
        // A third user of the day is over the cap of two: counted with the others.
        (20, "acme", ["gpt", "openai", "chat", "u3"], 1_000),
        (21, "acme", ["llama", "vllm-a", "search", "u3"], 50),
        (21, "beta", ["llama", "vllm-a", "", "u9"], 7),
    ] {
        s.apply(&proposal(day(d), rollup(tenant, key, cost(micro), 2)));
    }
    let by = |dim, tenant, first, last| {
        report(
            s.usage.iter().map(|(d, t)| (*d, t)),
            first,
            last,
            tenant,
            dim,
        )
        .into_iter()
        .map(|r| (r.key, r.totals.cost_micro_usd, r.totals.requests))
        .collect::<Vec<_>>()
    };
    assert_eq!(
        by(UsageDimension::Feature, Some("acme"), 20, 21),
        [("chat".into(), 1_200, 2), ("search".into(), 350, 2)]
    );
    assert_eq!(
        by(UsageDimension::User, Some("acme"), 20, 20),
        [
            (OTHER_USERS.into(), 1_000, 1),
            ("u1".into(), 300, 1),
            ("u2".into(), 200, 1)
        ]
    );
    // The next day starts its own count of users.
    assert_eq!(
        by(UsageDimension::User, Some("acme"), 21, 21),
        [("u3".into(), 50, 1)]
    );
    assert_eq!(
        by(UsageDimension::Tenant, None, 0, 99),
        [("acme".into(), 1_550, 4), ("beta".into(), 7, 1)]
    );
    assert_eq!(
        by(UsageDimension::Provider, None, 21, 21),
        [("vllm-a".into(), 57, 2)]
    );
    assert_eq!(
        by(UsageDimension::Feature, Some("beta"), 0, 99),
        [(String::new(), 7, 1)],
        "calls with no feature are one row"
    );

    // The state keeps them over a snapshot, and a day kept as model → totals (before roll-ups
    // had providers, features and users) still reads.
    let round_trip: ClusterState =
        serde_json::from_slice(&serde_json::to_vec(&s).expect("encode")).expect("decode");
    assert_eq!(round_trip.usage, s.usage);
    let old: TenantDay =
        serde_json::from_str(r#"{"llama":{"requests":2,"prompt_tokens":30}}"#).expect("old");
    assert_eq!(old.model("llama").prompt_tokens, 30);
}

#[test]
fn a_spend_alert_is_recorded_once_and_old_days_are_dropped() {
    let mut s = ClusterState::default();
    let alert = |day: u64, threshold: &str| SpendAlert {
        id: SpendAlert::id_of(day, "acme", "", threshold),
        day,
        tenant: "acme".into(),
        threshold: threshold.into(),
        ..SpendAlert::default()
    };
    let fire = |a| Command::FireAlert(a);
    assert_eq!(
        s.apply(&proposal(5, fire(alert(10, "80%")))),
        Applied::Changed
    );
    // Another node (or a new leader) finding the same threshold crossed changes nothing.
    assert_eq!(
        s.apply(&proposal(6, fire(alert(10, "80%")))),
        Applied::Unchanged
    );
    assert_eq!(s.alerts[&alert(10, "80%").id].fired_at_unix_ms, 5);
    let delivered = |id: String| Command::AlertDelivered { id };
    assert_eq!(
        s.apply(&proposal(7, delivered(alert(10, "80%").id))),
        Applied::Changed
    );
    assert_eq!(
        s.apply(&proposal(8, delivered(alert(10, "80%").id))),
        Applied::Unchanged
    );
    assert_eq!(s.alerts[&alert(10, "80%").id].delivered_at_unix_ms, Some(7));
    assert_eq!(
        s.apply(&proposal(9, delivered("nope".into()))),
        Applied::NotFound
    );
    // Two days on, day 10's alerts go; day 11's stay.
    s.apply(&proposal(10, fire(alert(11, "50%"))));
    s.apply(&proposal(11, fire(alert(12, "50%"))));
    assert_eq!(
        s.alerts.keys().cloned().collect::<Vec<_>>(),
        [alert(11, "50%").id, alert(12, "50%").id]
    );
}

fn trip(provider: &str, expect_version: u64, groups: &[&[&str]]) -> Command {
    Command::SetBreaker {
        provider: provider.into(),
        state: BreakerState::Open {
            until_unix_ms: 5_000,
        },
        reason: "5 failures in a row".into(),
        trips: 1,
        forced: false,
        expect_version: Some(expect_version),
        groups: groups
            .iter()
            .map(|g| g.iter().map(|s| (*s).to_owned()).collect())
            .collect(),
    }
}

#[test]
fn breaker_changes_record_who_and_when() {
    let mut s = ClusterState::default();
    let open = trip("vllm-a", 0, &[]);
    assert_eq!(s.apply(&proposal(100, open.clone())), Applied::Changed);
    assert_eq!(
        s.apply(&proposal(200, open)),
        Applied::Unchanged,
        "decided on a state that has moved on"
    );
    assert_eq!(s.breakers["vllm-a"].since_unix_ms, 100);
    assert_eq!(s.breakers["vllm-a"].version, 1);
    let json = serde_json::to_vec(&s).expect("encode");
    assert_eq!(
        serde_json::from_slice::<ClusterState>(&json).expect("decode"),
        s
    );
}

#[test]
fn at_most_half_of_a_models_providers_are_ejected() {
    let mut s = ClusterState::default();
    let group: &[&str] = &["a", "b", "c", "d"];
    assert_eq!(
        s.apply(&proposal(1, trip("a", 0, &[group]))),
        Applied::Changed
    );
    assert_eq!(
        s.apply(&proposal(2, trip("b", 0, &[group]))),
        Applied::Changed
    );
    assert_eq!(
        s.apply(&proposal(3, trip("c", 0, &[group]))),
        Applied::Refused,
        "a third of four would leave fewer than half"
    );
    // A provider that also serves a model it has alone can never be ejected automatically.
    assert_eq!(
        s.apply(&proposal(4, trip("c", 0, &[&["c", "d"], &["c"]]))),
        Applied::Refused
    );
    // An operator can force what detection may not.
    let force = Command::SetBreaker {
        provider: "c".into(),
        state: BreakerState::Open {
            until_unix_ms: u64::MAX,
        },
        reason: "forced by an operator".into(),
        trips: 0,
        forced: true,
        expect_version: None,
        groups: Vec::new(),
    };
    assert_eq!(s.apply(&proposal(5, force)), Applied::Changed);
    assert_eq!(
        s.apply(&proposal(6, trip("c", 1, &[]))),
        Applied::Unchanged,
        "detection leaves a forced breaker alone"
    );
    assert!(s.breakers["c"].forced);
}

#[test]
fn a_retried_proposal_is_applied_once() {
    let mut s = ClusterState::default();
    s.apply(&proposal(1, grant(1, 500, 10_000)));
    let report = Command::Once {
        node: 1,
        seq: 7,
        command: Box::new(usage(1, 120_000, 100)),
    };
    assert_eq!(s.apply(&proposal(2, report.clone())), Applied::Changed);
    assert_eq!(s.apply(&proposal(3, report)), Applied::Unchanged);
    let older = Command::Once {
        node: 1,
        seq: 6,
        command: Box::new(usage(1, 120_000, 100)),
    };
    assert_eq!(s.apply(&proposal(4, older)), Applied::Unchanged);
    assert_eq!(s.ledger["tenant/acme/tokens_per_minute"].used, 100);
}

/// Every record with one field changed: each leaf (number + 1, string + "x", bool flipped)
/// and each list one entry longer, with the top-level field it belongs to. Null and empty
/// lists cannot be changed without knowing their type, so a fixture must set every field.
fn one_field_changes(v: &serde_json::Value, path: &str) -> Vec<(String, serde_json::Value)> {
    use serde_json::Value;
    match v {
        Value::Null => panic!("the fixture leaves {path} unset: set every field"),
        Value::Bool(b) => vec![(path.into(), Value::Bool(!b))],
        Value::Number(n) => {
            let n = n
                .as_u64()
                .unwrap_or_else(|| panic!("{path}: {n} is not a u64"));
            vec![(path.into(), Value::from(n + 1))]
        }
        Value::String(t) => vec![(path.into(), Value::String(format!("{t}x")))],
        Value::Array(items) => {
            let last = items
                .last()
                .unwrap_or_else(|| panic!("the fixture leaves {path} empty: fill every list"));
            let mut longer = items.clone();
            longer.push(last.clone());
            let mut all = vec![(path.into(), Value::Array(longer))];
            for (i, item) in items.iter().enumerate() {
                for (p, changed) in one_field_changes(item, &format!("{path}[{i}]")) {
                    let mut copy = items.clone();
                    copy[i] = changed;
                    all.push((p, Value::Array(copy)));
                }
            }
            all
        }
        Value::Object(fields) => {
            let mut all = Vec::new();
            for (k, field) in fields {
                for (p, changed) in one_field_changes(field, &format!("{path}.{k}")) {
                    let mut copy = fields.clone();
                    copy.insert(k.clone(), changed);
                    all.push((p, Value::Object(copy)));
                }
            }
            all
        }
    }
}

/// Builds `fixture` (every field set), then for every one-field change of it except in
/// `set_by_apply`, applies the upsert `command` of the changed record to `state` and hands
/// `check` the outcome and the record as it went in. Returns the top-level fields changed,
/// so the caller can see that each field was tried.
fn for_each_field_change<T>(
    fixture: &T,
    set_by_apply: &[&str],
    mut apply: impl FnMut(&T) -> Applied,
    mut check: impl FnMut(&str, Applied, &T),
) -> std::collections::BTreeSet<String>
where
    T: Serialize + serde::de::DeserializeOwned,
{
    let json = serde_json::to_value(fixture).expect("serializes");
    let mut fields = std::collections::BTreeSet::new();
    for (path, changed) in one_field_changes(&json, "") {
        let top = path.trim_start_matches('.');
        let top = top.split(['.', '[']).next().unwrap_or(top).to_owned();
        if set_by_apply.contains(&top.as_str()) {
            continue;
        }
        // A changed enum tag names no variant: skipped (its other fields still change).
        let Ok(record) = serde_json::from_value::<T>(changed) else {
            continue;
        };
        let outcome = apply(&record);
        check(&path, outcome, &record);
        fields.insert(top);
    }
    fields
}

/// The top-level fields of `fixture`'s serialized form but `set_by_apply`.
fn fields_of<T: Serialize>(fixture: &T, set_by_apply: &[&str]) -> Vec<String> {
    match serde_json::to_value(fixture).expect("serializes") {
        serde_json::Value::Object(m) => m
            .keys()
            .filter(|k| !set_by_apply.contains(&k.as_str()))
            .cloned()
            .collect(),
        other => panic!("not a record: {other}"),
    }
}

fn limits(base: u64) -> Limits {
    Limits {
        requests_per_minute: Some(base + 1),
        tokens_per_minute: Some(base + 2),
        tokens_per_day: Some(base + 3),
        tokens_per_month: Some(base + 4),
        cost_per_day_micro_usd: Some(base + 5),
    }
}

/// A state with `record` applied first, then each one-field change of it applied on a copy:
/// every change must be applied (Changed) and read back as it went in.
fn assert_every_field_is_compared<T>(
    name: &str,
    base: &ClusterState,
    record: &T,
    set_by_apply: &[&str],
    command: impl Fn(&T) -> Command,
    stored: impl Fn(&ClusterState, &T) -> Option<T>,
) where
    T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut first = base.clone();
    assert_eq!(
        first.apply(&proposal(100, command(record))),
        Applied::Changed,
        "{name}: the fixture is applied"
    );
    assert_eq!(
        first.apply(&proposal(101, command(record))),
        Applied::Unchanged,
        "{name}: the same record again is a repeat"
    );
    let normalized = |s: &ClusterState, r: &T| {
        let mut v = serde_json::to_value(stored(s, r).expect("stored")).expect("serializes");
        for f in set_by_apply {
            v.as_object_mut().expect("record").remove(*f);
        }
        v
    };
    let tried = for_each_field_change(
        record,
        set_by_apply,
        |changed| {
            let mut s = first.clone();
            let outcome = s.apply(&proposal(200, command(changed)));
            let mut want = serde_json::to_value(changed).expect("serializes");
            for f in set_by_apply {
                want.as_object_mut().expect("record").remove(*f);
            }
            if outcome == Applied::Changed {
                assert_eq!(normalized(&s, changed), want, "{name}: read back");
            }
            outcome
        },
        |path, outcome, _| {
            assert_eq!(
                outcome,
                Applied::Changed,
                "{name}: changing only {path} must be applied"
            );
        },
    );
    let all: std::collections::BTreeSet<_> = fields_of(record, set_by_apply).into_iter().collect();
    assert_eq!(tried, all, "{name}: every field was changed once");
}

#[test]
fn an_upsert_that_changes_any_one_field_of_any_record_is_applied() {
    let mut base = ClusterState::default();
    for tier in ["pro", "prox"] {
        base.tiers.insert(
            tier.into(),
            Tier {
                name: tier.into(),
                ..Tier::default()
            },
        );
    }
    let tenant = Tenant {
        id: "acme".into(),
        tier: "pro".into(),
        overrides: limits(10),
        per_user: limits(20),
        features: BTreeMap::from([("search".into(), limits(30))]),
        regions: vec!["eu-west".into()],
        models: vec!["llama".into()],
        weight: 3,
        created_at_unix_ms: 1,
        updated_at_unix_ms: 1,
        engine_fields: vec!["priority".into()],
    };
    assert_every_field_is_compared(
        "tenant",
        &base,
        &tenant,
        &["created_at_unix_ms", "updated_at_unix_ms"],
        |t| Command::UpsertTenant(t.clone()),
        |s, t| s.tenants.get(&t.id).cloned(),
    );
    let tier = Tier {
        name: "team".into(),
        limits: limits(40),
        per_user: limits(50),
    };
    assert_every_field_is_compared(
        "tier",
        &base,
        &tier,
        &[],
        |t| Command::UpsertTier(t.clone()),
        |s, t| s.tiers.get(&t.name).cloned(),
    );
    let record = ProviderRecord {
        price: ProviderPrice {
            input: 1,
            output: 2,
            cached_input: 3,
        },
        replica: true,
        updated_at_unix_ms: 1,
        default_max_tokens: 300,
        api_key: "k".into(),
        ..provider("a")
    };
    assert_every_field_is_compared(
        "provider",
        &base,
        &record,
        &["updated_at_unix_ms"],
        |p| Command::UpsertProvider(p.clone()),
        |s, p| s.providers.get(&p.id).cloned(),
    );
    let member = Member {
        id: 2,
        region: "eu".into(),
        raft_addr: "127.0.0.2:7000".into(),
        http_addr: "127.0.0.2:8080".into(),
        mesh_addr: "127.0.0.2:7001".into(),
        started_unix_ms: 0,
        snapshot_format: 1,
    };
    assert_every_field_is_compared(
        "member",
        &base,
        &member,
        &[],
        |m| Command::UpsertMember(m.clone()),
        |s, m| s.members.get(&m.id).cloned(),
    );
    // A breaker is written by SetBreaker; its record is what the command sets.
    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Breaker {
        provider: String,
        #[serde(flatten)]
        record: BreakerRecord,
    }
    let breaker = Breaker {
        provider: "a".into(),
        record: BreakerRecord {
            state: BreakerState::Open {
                until_unix_ms: 5_000,
            },
            reason: "5 consecutive failures".into(),
            since_unix_ms: 1,
            by: 1,
            trips: 2,
            forced: true,
            version: 1,
        },
    };
    assert_every_field_is_compared(
        "breaker",
        &base,
        &breaker,
        &["since_unix_ms", "by", "version"],
        |b| Command::SetBreaker {
            provider: b.provider.clone(),
            state: b.record.state,
            reason: b.record.reason.clone(),
            trips: b.record.trips,
            forced: b.record.forced,
            expect_version: None,
            groups: Vec::new(),
        },
        |s, b| {
            s.breakers.get(&b.provider).map(|r| Breaker {
                provider: b.provider.clone(),
                record: r.clone(),
            })
        },
    );
}

#[test]
fn a_key_id_taken_by_another_record_is_refused_never_reported_unchanged() {
    let mut s = ClusterState::default();
    for (tier, tenant) in [("pro", "acme"), ("pro", "acmex")] {
        s.tiers.insert(
            tier.into(),
            Tier {
                name: tier.into(),
                ..Tier::default()
            },
        );
        s.tenants.insert(
            tenant.into(),
            Tenant {
                id: tenant.into(),
                tier: tier.into(),
                ..Tenant::default()
            },
        );
    }
    let key = ApiKeyRecord {
        id: "mk_1".into(),
        tenant: "acme".into(),
        sha256_hex: "ab".repeat(32),
        label: "ci".into(),
        created_at_unix_ms: 1,
        revoked_at_unix_ms: Some(1),
    };
    assert_eq!(
        s.apply(&proposal(1, Command::CreateApiKey(key.clone()))),
        Applied::Changed
    );
    let skip = ["created_at_unix_ms", "revoked_at_unix_ms", "id"];
    let tried = for_each_field_change(
        &key,
        &skip,
        |changed| {
            s.clone()
                .apply(&proposal(2, Command::CreateApiKey(changed.clone())))
        },
        |path, outcome, _| {
            assert_eq!(
                outcome,
                Applied::Refused,
                "a key with another {path} is refused"
            );
        },
    );
    assert_eq!(
        tried,
        fields_of(&key, &skip).into_iter().collect(),
        "every field was changed once"
    );
    s.apply(&proposal(3, Command::RevokeApiKey { id: "mk_1".into() }));
    assert_eq!(
        s.apply(&proposal(4, Command::CreateApiKey(key))),
        Applied::Refused,
        "a revoked key is not brought back by creating it again"
    );
    assert!(s.api_keys["mk_1"].revoked_at_unix_ms.is_some());
}

#[test]
fn changed_fields_names_each_difference_and_skips_what_apply_sets() {
    let old = Tenant {
        id: "acme".into(),
        tier: "t1".into(),
        regions: vec!["us".into()],
        updated_at_unix_ms: 1,
        ..Tenant::default()
    };
    let new = Tenant {
        regions: vec!["eu".into()],
        weight: 2,
        updated_at_unix_ms: 2,
        ..old.clone()
    };
    assert_eq!(
        changed_fields(Some(&old), &new, &["updated_at_unix_ms"]),
        [r#"regions: ["us"] → ["eu"]"#, "weight: 0 → 2"]
    );
    assert_eq!(changed_fields(None, &new, &[]), ["created"]);
    assert!(changed_fields(Some(&old), &old, &[]).is_empty());
}

/// A provider's kind is written as the name earlier versions wrote, and read back from it;
/// a name this version does not know survives a round trip.
#[test]
fn provider_kinds_keep_their_recorded_names() {
    for (text, kind) in [
        ("\"openai\"", ProviderKind::OpenAi),
        ("\"anthropic\"", ProviderKind::Anthropic),
        ("\"demo\"", ProviderKind::Demo),
        ("\"mesh\"", ProviderKind::Mesh),
        ("\"vllm\"", ProviderKind::Vllm),
        ("\"tgi\"", ProviderKind::Other("tgi".into())),
    ] {
        let read: ProviderKind = serde_json::from_str(text).unwrap();
        assert_eq!(read, kind, "{text}");
        assert_eq!(serde_json::to_string(&read).unwrap(), text);
    }
    let record = serde_json::to_value(provider("a")).unwrap();
    assert_eq!(record["kind"], "openai");
}
