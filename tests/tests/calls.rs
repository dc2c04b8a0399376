//! The per-call log: every request leaves one row in `<data_dir>/calls.sqlite`, written off the
//! request path, that the `sqlite3` shell can query as it is.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_proto::pb::admin as pb;
use meridian_tests::procs::{Admin, Harness};
use meridian_tests::{chat_body, node_with_priced_mock, run_tool, wait_until};

/// `sql` run by the `sqlite3` shell on `db`, as CSV rows.
fn sqlite3(db: &Path, sql: &str) -> Vec<String> {
    let db = db.to_string_lossy();
    run_tool(
        "sqlite3",
        "sqlite3",
        &["-csv", "-readonly", &db, sql],
        None,
        None,
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

/// The admin API's last `last` calls (0: all) of `tenant` (empty: every tenant's), newest first.
async fn list_calls(
    admin: &mut Admin,
    tenant: &str,
    last: u32,
) -> Result<Vec<pb::CallRecord>, tonic::Status> {
    let list = pb::ListCallsRequest {
        tenant: tenant.into(),
        last,
    };
    Ok(admin.list_calls(list).await?.into_inner().calls)
}

#[tokio::test]
async fn every_call_leaves_one_row_that_the_sqlite3_shell_reports_on() {
    let (_mock, node) = node_with_priced_mock("").await.unwrap();
    let db = node.data.as_ref().unwrap().path().join("calls.sqlite");
    // Three calls for feature "search" (one streamed), two for "chat", one with none, and one
    // for a model nobody serves.
    let mut expected_cost: std::collections::BTreeMap<&str, u64> = Default::default();
    for (feature, stream) in [
        ("search", false),
        ("search", true),
        ("search", false),
        ("chat", false),
        ("chat", false),
        ("", false),
    ] {
        let mut req = node
            .chat_request()
            .header("content-type", "application/json")
            .body(chat_body(
                "m",
                stream,
                if stream {
                    r#""stream_options":{"include_usage":true}"#
                } else {
                    ""
                },
            ));
        if !feature.is_empty() {
            req = req.header("x-meridian-feature", feature);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.text().await.unwrap();
        let usage: serde_json::Value = if stream {
            let last = body
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .rfind(|d| *d != "[DONE]")
                .unwrap()
                .to_owned();
            serde_json::from_str::<serde_json::Value>(&last).unwrap()["usage"].clone()
        } else {
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["usage"].clone()
        };
        let (p, c) = (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap(),
        );
        *expected_cost.entry(feature).or_default() += p * 2 + c * 8;
    }
    let unknown = node
        .post_chat(chat_body("no-such-model", false, ""))
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    wait_until("seven rows", Duration::from_secs(5), || async {
        db.exists() && sqlite3(&db, "SELECT COUNT(*) FROM calls") == ["7"]
    })
    .await
    .unwrap();
    // The question users ask of it, as they would write it.
    let by_feature = sqlite3(
        &db,
        "SELECT feature, SUM(cost_usd) FROM calls WHERE code = 'ok' GROUP BY feature ORDER BY feature",
    );
    let got: Vec<(String, f64)> = by_feature
        .iter()
        .map(|row| {
            let (feature, usd) = row.rsplit_once(',').unwrap();
            (feature.to_owned(), usd.parse().unwrap())
        })
        .collect();
    assert_eq!(got.len(), 3, "{by_feature:?}");
    for ((feature, usd), key) in got.iter().zip(["", "chat", "search"]) {
        assert_eq!(feature, key);
        let want = expected_cost[key] as f64 / 1e6;
        assert!(
            (usd - want).abs() < 1e-12,
            "{feature}: {usd} against {want}"
        );
    }
    // One row's fields, as recorded.
    let rows = sqlite3(
        &db,
        "SELECT tenant, model, served_model, provider, attempts, code, stream, cache_hit, \
         cancelled, input_tokens > 0, output_tokens > 0, duration_ms > 0, ttft_ms IS NOT NULL \
         FROM calls WHERE feature = 'search' ORDER BY time_unix_ms",
    );
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0], "dev,m,m,mock,1,ok,0,0,0,1,1,1,0");
    assert_eq!(
        rows[1], "dev,m,m,mock,1,ok,1,0,0,1,1,1,1",
        "the streamed call"
    );
    assert_eq!(
        sqlite3(
            &db,
            "SELECT model, provider, code FROM calls WHERE code <> 'ok'"
        ),
        ["no-such-model,,model_not_found"]
    );

    // The admin API lists them, newest first, for one tenant or all.
    let mut admin = node.admin_client().await.unwrap();
    let newest = list_calls(&mut admin, "", 2).await.unwrap();
    assert_eq!(newest.len(), 2);
    assert_eq!(newest[0].code, "model_not_found");
    assert_eq!(
        newest[1].feature, "",
        "the call with no feature came just before"
    );
    assert!(newest[0].time_unix_ms >= newest[1].time_unix_ms);
    let all = list_calls(&mut admin, "dev", 0).await.unwrap();
    assert_eq!(all.len(), 7);
    let streamed: Vec<_> = all.iter().filter(|c| c.stream).collect();
    assert_eq!(streamed.len(), 1);
    assert!(streamed[0].ttft_ms > 0.0 && streamed[0].ttft_ms <= streamed[0].duration_ms);
    assert_eq!(
        all.iter().map(|c| c.cost_micro_usd).sum::<u64>(),
        expected_cost.values().sum::<u64>()
    );
    assert!(
        list_calls(&mut admin, "nobody", 0)
            .await
            .unwrap()
            .is_empty()
    );
    let refused = list_calls(&mut admin, "", 5_000).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
}

/// The loss bound of the per-call log, measured: a node process under load is killed with
/// `kill -9`; every request it answered before must have its row, except those answered in
/// the last moments (the batch being gathered, at most 100 ms of calls, and the one being
/// committed). No row may be for a request that was not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_under_load_loses_only_the_calls_of_the_last_moments() {
    let mut h = Harness::new(24);
    // No keys and no limits: as many calls as the node can take.
    h.extra.insert(1, "[auth]\nenabled = false\n".into());
    h.boot(&[1]).await;
    let url = format!("{}/v1/chat/completions", h.node(1).http());
    let answered = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let sent = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        let (answered, sent) = (Arc::clone(&answered), Arc::clone(&sent));
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            loop {
                sent.fetch_add(1, Ordering::SeqCst);
                let resp = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(chat_body("demo", false, ""))
                    .send()
                    .await;
                // Any status is an answer (a 429 is a call too); no answer: the node is gone.
                let Ok(resp) = resp else { return };
                if resp.bytes().await.is_err() {
                    return;
                }
                answered.lock().unwrap().push(Instant::now());
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed_at = Instant::now();
    h.kill(1);
    for c in clients {
        c.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    let sent = sent.load(Ordering::SeqCst);
    let rows: u64 = sqlite3(
        &h.data_dir(1).join("calls.sqlite"),
        "SELECT COUNT(*) FROM calls",
    )[0]
    .parse()
    .unwrap();
    let lost = (answered.len() as u64).saturating_sub(rows);
    let recent = |ms: u64| {
        answered
            .iter()
            .filter(|t| killed_at.duration_since(**t) <= Duration::from_millis(ms))
            .count() as u64
    };
    println!(
        "kill -9 after 3 s: {} answered, {rows} rows, {lost} answered calls without a row; \
         answered in the last 100 ms: {}, 250 ms: {}, 500 ms: {}",
        answered.len(),
        recent(100),
        recent(250),
        recent(500)
    );
    assert!(
        answered.len() > 100,
        "too little load to judge: {}",
        answered.len()
    );
    assert!(rows <= sent, "{rows} rows for {sent} requests sent");
    assert!(
        lost <= recent(500),
        "{lost} answered calls have no row; only {} were answered in the last 500 ms",
        recent(500)
    );
}

/// A call is billed at the price list of the provider that answered, when it has one, and at
/// its model's otherwise; the call log, the metrics and the tenant's roll-up agree.
#[tokio::test]
async fn a_call_is_billed_at_the_price_of_the_provider_that_answered() {
    // The model's price: $2 in, $8 out. The provider's own: $1 in, $3 out.
    let (_mock, node) = node_with_priced_mock("price_input = 1.0\nprice_output = 3.0")
        .await
        .unwrap();
    let resp = node
        .post_chat_with_header("x-meridian-cost", "on", chat_body("m", false, ""))
        .await
        .unwrap();
    let header = resp.headers()["x-meridian-cost-usd"]
        .to_str()
        .unwrap()
        .to_owned();
    let answer: serde_json::Value = resp.json().await.unwrap();
    let (p, c) = (
        answer["usage"]["prompt_tokens"].as_u64().unwrap(),
        answer["usage"]["completion_tokens"].as_u64().unwrap(),
    );
    let want = p + 3 * c;
    assert_eq!(
        header,
        format!("0.{want:06}"),
        "the cost the client asked for"
    );
    // Not asked for: not given.
    let plain = node.post_chat(chat_body("m", false, "")).await.unwrap();
    assert!(plain.headers().get("x-meridian-cost-usd").is_none());
    let db = node.data.as_ref().unwrap().path().join("calls.sqlite");
    wait_until("the row", Duration::from_secs(5), || async {
        db.exists() && sqlite3(&db, "SELECT COUNT(*) FROM calls") == ["2"]
    })
    .await
    .unwrap();
    assert_eq!(
        sqlite3(&db, "SELECT DISTINCT cost_micro_usd FROM calls"),
        [want.to_string()]
    );
    let text = node.metrics().await;
    assert!(
        text.contains(&format!(
            r#"meridian_cost_micro_usd_total{{model="m",provider="mock",tenant="dev",feature=""}} {}"#,
            2 * want
        )),
        "{text}"
    );
}
