//! The per-call log: every request leaves one row in `<data_dir>/calls.sqlite`, written off the
//! request path, that the `sqlite3` shell can query as it is.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meridian_tests::mock::Flavor;
use meridian_tests::{chat_body, node_with_mock, wait_until};

/// `sql` run by the `sqlite3` shell on `db` (Debian's `sqlite3` package), as CSV rows.
fn sqlite3(db: &Path, sql: &str) -> Vec<String> {
    let out = Command::new("sqlite3")
        .args(["-csv", "-readonly"])
        .arg(db)
        .arg(sql)
        .output()
        .expect("the sqlite3 shell runs (install Debian's `sqlite3` package)");
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_call_leaves_one_row_that_the_sqlite3_shell_reports_on() {
    let prices = "[[prices]]\nmodel = \"m\"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\n";
    let (_mock, node) = node_with_mock(Flavor::Vllm, &["m"], "", prices)
        .await
        .unwrap();
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
}
