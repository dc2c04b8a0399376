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
