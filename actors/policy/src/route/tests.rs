use super::*;

fn load(in_flight: u32, queued: u32, max_concurrency: u32) -> Load {
    Load {
        in_flight,
        queued,
        max_concurrency,
        weight: 1,
        ..Load::default()
    }
}

fn check(candidates: &[Load], expected: Option<usize>) {
    assert_eq!(
        rank_by_load(candidates.iter().copied()).first().copied(),
        expected,
        "{candidates:?}"
    );
}

#[test]
fn every_candidate_is_ranked_and_ties_keep_their_order() {
    let ranked = rank_by_load([
        load(8, 0, 10),
        load(1, 0, 10),
        load(5, 5, 10),
        load(1, 0, 10),
    ]);
    assert_eq!(ranked, [1, 3, 0, 2]);
}

#[test]
fn picks_the_least_loaded_relative_to_capacity() {
    check(&[], None);
    check(&[load(5, 0, 10)], Some(0));
    check(&[load(0, 0, 10), load(0, 0, 10)], Some(0));
    check(&[load(3, 0, 10), load(1, 0, 10)], Some(1));
    // 4/8 is less loaded than 3/4.
    check(&[load(3, 0, 4), load(4, 0, 8)], Some(1));
    // Queued requests count as load.
    check(&[load(2, 5, 10), load(4, 0, 10)], Some(1));
    // A zero capacity never divides by zero.
    check(&[load(1, 0, 0), load(0, 0, 0)], Some(1));
}

fn cand(region: &str, in_flight: u32, breaker: Gate) -> Candidate<'_> {
    Candidate {
        region,
        load: load(in_flight, 0, 10),
        breaker,
        affinity: None,
    }
}

/// (candidates, own region, allowed regions, expected order or refusal)
type Case<'a> = (
    Vec<Candidate<'a>>,
    &'a str,
    Vec<String>,
    Result<Vec<usize>, NoRoute>,
);

#[test]
fn the_routing_plan_table() {
    use Gate::{Closed, Open, Probe};
    let eu = || vec!["eu".to_owned()];
    let any = Vec::<String>::new;
    let cases: Vec<Case<'_>> = vec![
        // Own region first, then load; ties keep configuration order.
        (
            vec![
                cand("us", 0, Closed),
                cand("eu", 5, Closed),
                cand("eu", 1, Closed),
            ],
            "eu",
            any(),
            Ok(vec![2, 1, 0]),
        ),
        // No own-region provider: by load.
        (
            vec![cand("us", 3, Closed), cand("ap", 1, Closed)],
            "eu",
            any(),
            Ok(vec![1, 0]),
        ),
        // Residency: only EU providers, even when the others are idle, and never as fallbacks.
        (
            vec![
                cand("us", 0, Closed),
                cand("eu", 9, Closed),
                cand("ap", 0, Closed),
            ],
            "us",
            eu(),
            Ok(vec![1]),
        ),
        (
            vec![cand("us", 0, Closed), cand("ap", 0, Closed)],
            "us",
            eu(),
            Err(NoRoute::Residency),
        ),
        // Open breakers are skipped; all open (among the allowed) is said so.
        (
            vec![cand("eu", 0, Open), cand("eu", 5, Closed)],
            "eu",
            any(),
            Ok(vec![1]),
        ),
        (
            vec![cand("eu", 0, Open), cand("us", 0, Closed)],
            "eu",
            eu(),
            Err(NoRoute::AllEjected),
        ),
        // A probe goes first, even from another region and loaded.
        (
            vec![cand("eu", 0, Closed), cand("us", 8, Probe)],
            "eu",
            any(),
            Ok(vec![1, 0]),
        ),
        (vec![], "eu", any(), Err(NoRoute::Residency)),
    ];
    for (candidates, own, regions, expected) in cases {
        assert_eq!(
            plan(&candidates, own, &regions, 0, None),
            expected,
            "{candidates:?} own={own} allowed={regions:?}"
        );
    }
}

#[test]
fn the_complexity_table() {
    use Complexity::{Hard, Moderate, Trivial};
    let rules = ComplexityRules::default();
    let s = |prompt_tokens, has_code, has_tools, explicit| Signals {
        prompt_tokens,
        has_code,
        has_tools,
        explicit,
    };
    let cases = [
        (s(10, false, false, None), Trivial),
        (s(255, false, false, None), Trivial),
        (s(256, false, false, None), Moderate),
        (s(3_999, false, false, None), Moderate),
        (s(4_000, false, false, None), Hard),
        // Code makes a short prompt at least moderate; tools make it hard.
        (s(10, true, false, None), Moderate),
        (s(10, false, true, None), Hard),
        (s(5_000, true, false, None), Hard),
        // The header wins, both ways.
        (s(10, false, true, Some(Trivial)), Trivial),
        (s(10, false, false, Some(Hard)), Hard),
    ];
    for (signals, expected) in cases {
        assert_eq!(classify(&rules, signals), expected, "{signals:?}");
    }
    let strict = ComplexityRules {
        code: Hard,
        tools: Moderate,
        ..rules
    };
    assert_eq!(classify(&strict, s(10, true, false, None)), Hard);
    assert_eq!(classify(&strict, s(10, false, true, None)), Moderate);
}

#[test]
fn an_empty_tier_borrows_the_next_harder_one() {
    let alias = Alias {
        trivial: vec![],
        moderate: vec!["mid".into()],
        hard: vec!["big".into(), "bigger".into()],
        rules: ComplexityRules::default(),
    };
    assert_eq!(alias.models(Complexity::Trivial), ["mid"]);
    assert_eq!(alias.models(Complexity::Moderate), ["mid"]);
    assert_eq!(alias.models(Complexity::Hard), ["big", "bigger"]);
    let only_small = Alias {
        trivial: vec!["small".into()],
        ..Alias::default()
    };
    assert_eq!(only_small.models(Complexity::Hard), ["small"]);
}

#[test]
fn equally_idle_providers_share_the_first_choice_and_a_busy_one_never_wins_a_draw() {
    use std::collections::BTreeMap;
    let cands = [
        cand("eu", 0, Gate::Closed),
        cand("eu", 0, Gate::Closed),
        cand("eu", 0, Gate::Closed),
        cand("eu", 9, Gate::Closed),
    ];
    let mut first = BTreeMap::new();
    for random in 0..1_000u64 {
        let order = plan(
            &cands,
            "eu",
            &[],
            random.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            None,
        )
        .unwrap();
        assert_eq!(order.len(), 4, "every candidate stays a fallback");
        *first.entry(order[0]).or_insert(0) += 1;
    }
    assert_eq!(
        first.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2],
        "{first:?}"
    );
    assert!(first.values().all(|&n| n > 200), "roughly even: {first:?}");
    // Only the best class draws: an idle provider in another region never goes first.
    let cands = [
        cand("us", 0, Gate::Closed),
        cand("eu", 5, Gate::Closed),
        cand("eu", 6, Gate::Closed),
    ];
    for random in 0..100u64 {
        assert_ne!(plan(&cands, "eu", &[], random, None).unwrap()[0], 0);
    }
}

fn member(id: &str, in_flight: u32) -> (&str, Load) {
    (id, load(in_flight, 0, 10))
}

#[test]
fn a_conversation_sticks_to_one_replica_unless_it_is_overloaded() {
    let idle = [member("r1", 0), member("r2", 0), member("r3", 0)];
    // The same key always lands on the same replica; keys spread over all of them.
    let mut spread = [0; 3];
    for key in 0..3_000u64 {
        let k = fnv1a(&key.to_le_bytes());
        let first = affine(k, &idle);
        assert_eq!(affine(k, &idle), first);
        spread[first] += 1;
    }
    assert!(spread.iter().all(|&n| n > 800), "{spread:?}");
    // Bounded load: a replica far above the average gives way to the next in the key's order.
    let k = fnv1a(b"system: you are a pirate");
    let home = affine(k, &idle);
    let mut busy = idle;
    busy[home].1 = load(9, 0, 10);
    let moved = affine(k, &busy);
    assert_ne!(moved, home);
    // A little extra load does not move it.
    let mut warm = idle;
    warm[home].1 = load(1, 0, 10);
    warm[(home + 1) % 3].1 = load(1, 0, 10);
    assert_eq!(affine(k, &warm), home);
    // Consistent: removing a replica moves only the keys it held.
    let two = [member("r1", 0), member("r2", 0)];
    for key in 0..1_000u64 {
        let k = fnv1a(&key.to_le_bytes());
        let before = affine(k, &idle);
        if before != 2 {
            assert_eq!(
                affine(k, &two),
                before,
                "key {key} moved though its replica stayed"
            );
        }
    }
}

#[test]
fn plan_uses_affinity_only_when_the_whole_first_group_takes_part() {
    let with = |id| Candidate {
        region: "eu",
        load: load(0, 0, 10),
        breaker: Gate::Closed,
        affinity: Some(id),
    };
    let cands = [with("r1"), with("r2"), with("r3")];
    let key = fnv1a(b"a conversation");
    let firsts: std::collections::BTreeSet<usize> = (0..50u64)
        .map(|random| plan(&cands, "eu", &[], random, Some(key)).unwrap()[0])
        .collect();
    assert_eq!(firsts.len(), 1, "the draw does not matter: the key decides");
    // One provider without affinity in the group: the power of two choices as usual.
    let mixed = [with("r1"), with("r2"), cand("eu", 0, Gate::Closed)];
    let firsts: std::collections::BTreeSet<usize> = (0..200u64)
        .map(|r| {
            plan(
                &mixed,
                "eu",
                &[],
                r.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                Some(key),
            )
            .unwrap()[0]
        })
        .collect();
    assert!(firsts.len() > 1);
}

#[test]
fn the_engines_own_counts_add_to_load() {
    let engine = |in_flight, running, waiting, kv| Load {
        in_flight,
        max_concurrency: 10,
        weight: 1,
        engine_running: running,
        engine_waiting: waiting,
        kv_permille: kv,
        ..Load::default()
    };
    // Our 2 in flight, but the engine runs 8 (other nodes' too): the other one is less loaded.
    assert_eq!(
        rank_by_load([engine(2, 8, 0, 0), engine(3, 3, 0, 0)]),
        [1, 0]
    );
    // Requests waiting inside the engine count as load.
    assert_eq!(
        rank_by_load([engine(2, 2, 4, 0), engine(3, 3, 0, 0)]),
        [1, 0]
    );
    // At equal load, the emptier KV cache first.
    assert_eq!(
        rank_by_load([engine(2, 2, 0, 900), engine(2, 2, 0, 100)]),
        [1, 0]
    );
}

#[test]
fn weight_scales_capacity_and_price_breaks_ties() {
    let w = |in_flight, weight, price| Load {
        in_flight,
        queued: 0,
        max_concurrency: 10,
        weight,
        price,
        ..Load::default()
    };
    // 4 in flight of 2 × 10 is less loaded than 3 of 10.
    assert_eq!(rank_by_load([w(3, 1, 0), w(4, 2, 0)]), [1, 0]);
    // Equal load: the cheaper first (an unpriced provider, e.g. self-hosted, counts as free).
    assert_eq!(
        rank_by_load([w(1, 1, 900), w(1, 1, 100), w(1, 1, 0)]),
        [2, 1, 0]
    );
    // Load still comes before price.
    assert_eq!(rank_by_load([w(5, 1, 0), w(1, 1, 900)]), [1, 0]);
    // In the draw too: an equally idle but dearer provider never goes first.
    let cands = [
        Candidate {
            region: "eu",
            load: w(0, 1, 500),
            breaker: Gate::Closed,
            affinity: None,
        },
        Candidate {
            region: "eu",
            load: w(0, 1, 100),
            breaker: Gate::Closed,
            affinity: None,
        },
    ];
    for random in 0..50 {
        assert_eq!(plan(&cands, "eu", &[], random, None).unwrap()[0], 1);
    }
}
