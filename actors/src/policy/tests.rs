use super::*;

fn load(in_flight: u32, queued: u32, max_concurrency: u32) -> Load {
    Load {
        in_flight,
        queued,
        max_concurrency,
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
            plan(&candidates, own, &regions),
            expected,
            "{candidates:?} own={own} allowed={regions:?}"
        );
    }
}
