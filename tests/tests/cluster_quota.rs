//! Cluster-exact quotas with real processes: three `meridian` nodes admit one tenant limited to
//! 60,000 tokens/min, hammered through all three at once. Ground truth is the mock upstream's
//! own count of tokens it served. Two full windows must each land within [0.9, 1.02] × the
//! limit; a window in which the Raft leader is killed must stay ≤ 1.05 × the limit.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_proto::pb::admin as pb;
use meridian_tests::mock::{Flavor, MockOptions, MockUpstream};
use meridian_tests::procs::Harness;
use meridian_tests::provider_toml;

const LIMIT: u64 = 60_000;
const T: Duration = Duration::from_secs(30);

fn served(mock: &MockUpstream) -> u64 {
    mock.stats.prompt_tokens.load(Ordering::SeqCst)
        + mock.stats.completion_tokens.load(Ordering::SeqCst)
}

/// Sleeps until the next whole minute of wall-clock time (quota windows are aligned to it).
async fn until_next_minute() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let into = now.as_millis() % 60_000;
    tokio::time::sleep(Duration::from_millis((60_000 - into) as u64)).await;
}

#[tokio::test]
async fn one_tenants_limit_holds_across_three_nodes_and_through_a_leader_kill() {
    let mock = MockUpstream::start(MockOptions {
        flavor: Flavor::Vllm,
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let mut h = Harness::new(16);
    h.providers = provider_toml(
        "mock",
        &mock.base_url(),
        &["mock@tokens:40"],
        "max_concurrency = 256\nqueue_capacity = 1024",
    );
    h.boot(&[1, 2, 3]).await;
    let mut admin = h.admin(2).await.unwrap();
    admin
        .put_tier(pb::PutTierRequest {
            tier: Some(pb::Tier {
                name: "metered".into(),
                limits: Some(pb::Limits {
                    tokens_per_minute: Some(LIMIT),
                    ..pb::Limits::default()
                }),
                ..pb::Tier::default()
            }),
        })
        .await
        .unwrap();
    admin
        .put_tenant(pb::PutTenantRequest {
            tenant: Some(pb::Tenant {
                id: "acme".into(),
                tier: "metered".into(),
                ..pb::Tenant::default()
            }),
        })
        .await
        .unwrap();
    let key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            tenant: "acme".into(),
            label: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .secret;

    // Hammer: 12 clients spread over the three nodes, far more demand than the limit.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let urls: Vec<String> = [1, 2, 3]
        .iter()
        .map(|id| format!("{}/v1/chat/completions", h.node(*id).http()))
        .collect();
    let mut clients = Vec::new();
    for c in 0..12 {
        let (stop, ok, limited, other) = (
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&limited),
            Arc::clone(&other),
        );
        let url = urls[c % 3].clone();
        let key = key.clone();
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let body = r#"{"model":"mock@tokens:40","max_tokens":40,"messages":[{"role":"user","content":"count to forty"}]}"#;
            while !stop.load(Ordering::Relaxed) {
                let resp = client
                    .post(&url)
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match resp.map(|r| r.status().as_u16()) {
                    Ok(200) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(429) => {
                        limited.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => {
                        other.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }

    until_next_minute().await;
    let mut marks = vec![served(&mock)];
    for window in 1..=3 {
        if window == 3 {
            // Kill the leader 2 s into the third window, while the budget is being spent.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let leader = h.agreed_leader(&[1, 2, 3], None, T).await;
            h.kill(leader);
            println!("window 3: killed leader {leader} 2 s in");
        }
        until_next_minute().await;
        marks.push(served(&mock));
        let n = marks[window] - marks[window - 1];
        println!(
            "window {window}: {n} tokens served by the mock = {:.3} × the limit ({} ok, {} limited, {} other so far)",
            n as f64 / LIMIT as f64,
            ok.load(Ordering::Relaxed),
            limited.load(Ordering::Relaxed),
            other.load(Ordering::Relaxed),
        );
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    for window in 1..=2 {
        let n = (marks[window] - marks[window - 1]) as f64 / LIMIT as f64;
        assert!(
            (0.9..=1.02).contains(&n),
            "window {window}: {n:.3} × the limit is outside [0.9, 1.02]"
        );
    }
    let n = (marks[3] - marks[2]) as f64 / LIMIT as f64;
    assert!(
        n <= 1.05,
        "window with the leader killed: {n:.3} × the limit"
    );
    assert!(
        limited.load(Ordering::Relaxed) > 0,
        "the limit was never reached"
    );
}
