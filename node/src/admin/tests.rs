use super::*;
use meridian_proto::cluster::Table;

#[test]
fn a_replica_commands_failure_maps_to_its_code() {
    let code = |e| replica_answer(Err(e)).unwrap_err().code();
    let missing = ControlError::NoSuchReplica {
        name: "x-0".into(),
        known: "llama-0".into(),
    };
    assert_eq!(code(missing), tonic::Code::NotFound);
    assert_eq!(
        code(ControlError::Refused("llama-0 is ready already".into())),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        code(ControlError::NoAnswer("the vLLM supervisor")),
        tonic::Code::Unavailable
    );
    let done = replica_answer(Ok("llama-0: draining".into())).unwrap();
    assert_eq!(done.get_ref().message, "llama-0: draining");
}

#[test]
fn pages_cover_a_section_once_in_order_and_stay_small() {
    let mut table: Table<String, String> = Table::new();
    for i in 0..2_500 {
        table.insert(format!("tenant/t{:04}/user/u{i}", i % 7), "x".repeat(100));
    }
    let mut seen = Vec::new();
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let (records, next) = page_of(&table, "", &after, 1_000).expect("a page");
        pages += 1;
        assert!(records.len() <= 1_000);
        seen.extend(records.keys().cloned());
        if next.is_empty() {
            break;
        }
        after = next;
    }
    assert_eq!(pages, 3);
    let all: Vec<String> = table.keys().cloned().collect();
    assert_eq!(seen, all, "every record once, in key order");

    let (one_tenant, next) = page_of(&table, "tenant/t0003/", "", 10_000).expect("a page");
    assert!(next.is_empty());
    assert!(one_tenant.keys().all(|k| k.starts_with("tenant/t0003/")));
    assert_eq!(one_tenant.len(), 357);

    // Large records: a page stops at about PAGE_BYTES whatever the limit.
    let mut big: Table<u64, String> = Table::new();
    for day in 0..40 {
        big.insert(day, "y".repeat(256 * 1024));
    }
    let (records, next) = page_of(&big, "", "", 10_000).expect("a page");
    let bytes = serde_json::to_string(&records).expect("encodes").len();
    assert!(bytes < 4 * 1024 * 1024, "{bytes} bytes");
    assert!(!next.is_empty() && records.len() < 40);
    assert!(
        page_of(&big, "", "not-a-day", 10).is_err(),
        "a bad cursor names the field"
    );
}

#[test]
fn every_replica_state_has_its_typed_life_with_the_same_name() {
    use meridian_actors::vllm::ReplicaState as S;
    for state in [
        S::Starting,
        S::Ready,
        S::Restarting,
        S::Backoff,
        S::Draining,
        S::Stopping,
        S::Stopped,
        S::Failed,
    ] {
        let name = life(state).as_str_name();
        assert_eq!(
            name.strip_prefix("REPLICA_LIFE_").map(str::to_lowercase),
            Some(state.as_str().to_owned()),
        );
    }
}

#[test]
fn ledger_pages_cover_every_entry_once_in_the_ledgers_order() {
    use meridian_proto::cluster::{Ledger, LedgerTable};
    let mut ledger = LedgerTable::default();
    for i in 0..2_500 {
        let key = format!("tenant/t{:04}/user/u{i}/tokens_per_day", i % 7);
        ledger.get_or_insert_with(&key, Ledger::default);
    }
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let (records, next) = ledger_page(&ledger, "tenant/t0003/", &after, 100).expect("a page");
        assert!(records.len() <= 100);
        seen.extend(records.keys().cloned());
        if next.is_empty() {
            break;
        }
        after = next;
    }
    let mut all: Vec<String> = (ledger.keys())
        .filter(|k| k.starts_with("tenant/t0003/"))
        .map(|k| k.to_string())
        .collect();
    assert_eq!(all.len(), 357);
    seen.sort();
    all.sort();
    assert_eq!(seen, all, "every entry of the prefix once");
}
