//! Routing through a real node: data residency, allowed models, locality, and a replica set that
//! keeps serving while one replica fails every request.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::sync::atomic::Ordering::SeqCst;

use meridian_proto::pb::admin as pb;
use meridian_tests::mock::{Flavor, MockUpstream};
use meridian_tests::{TestNode, chat_body, provider_toml};
use serde_json::Value;

async fn mock() -> MockUpstream {
    MockUpstream::with_flavor(Flavor::Vllm).await.unwrap()
}

fn tenant(id: &str, regions: &[&str], models: &[&str]) -> pb::Tenant {
    pb::Tenant {
        id: id.into(),
        tier: "dev".into(),
        regions: regions.iter().map(|r| (*r).to_owned()).collect(),
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        ..pb::Tenant::default()
    }
}

async fn chat(node: &TestNode, key: &str, model: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(node.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(chat_body(model, false, ""))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test]
async fn an_eu_only_tenant_is_never_served_outside_the_eu() {
    let us = mock().await;
    let eu = mock().await;
    // A provider that is down: nothing listens there.
    let down = meridian_tests::ReservedPort::new().unwrap();
    let toml = format!(
        "[node]\nregion = \"eu-west\"\n\n{}{}{}",
        provider_toml(
            "eu-1",
            &eu.base_url(),
            &["m=mock@tokens:2"],
            "region = \"eu-west\""
        ),
        provider_toml(
            "eu-2",
            &down.dead_url(),
            &["m=mock@tokens:2"],
            "region = \"eu-central\""
        ),
        provider_toml(
            "us-1",
            &us.base_url(),
            &["m=mock@tokens:2", "us-only=mock@tokens:2"],
            "region = \"us-east\""
        ),
    );
    let node = TestNode::start(&toml).await.unwrap();
    let eu_key = node
        .tenant_with_key(tenant("eu-co", &["eu-west", "eu-central"], &[]))
        .await
        .unwrap();
    let any_key = node
        .tenant_with_key(tenant("global", &[], &[]))
        .await
        .unwrap();

    // Healthy: the EU tenant is served in the EU; everyone prefers the node's own region.
    for _ in 0..5 {
        assert_eq!(chat(&node, &eu_key, "m").await.0, 200);
        assert_eq!(chat(&node, &any_key, "m").await.0, 200);
    }
    assert_eq!(us.stats.requests.load(SeqCst), 0, "own region first");
    // A model served only outside the tenant's regions: refused, and retrying cannot help.
    let (status, v) = chat(&node, &eu_key, "us-only").await;
    assert_eq!(status, 503);
    assert_eq!(v["error"]["code"], "no_provider_in_allowed_regions", "{v}");

    // Every EU provider down: the EU tenant gets 503s, never the idle US provider.
    eu.stop().await;
    for i in 0..12 {
        let (status, v) = chat(&node, &eu_key, "m").await;
        assert_eq!(status, 503, "request {i}: {v}");
        assert!(
            matches!(
                v["error"]["code"].as_str(),
                Some("all_providers_failed" | "circuit_open")
            ),
            "{v}"
        );
    }
    assert_eq!(
        us.stats.requests.load(SeqCst),
        0,
        "residency holds through every fallback"
    );
    // The unrestricted tenant falls back to the US.
    assert_eq!(chat(&node, &any_key, "m").await.0, 200);
    assert!(us.stats.requests.load(SeqCst) >= 1);
}

#[tokio::test]
async fn a_tenant_calls_only_its_allowed_models() {
    let m = mock().await;
    let toml = provider_toml("p", &m.base_url(), &["small", "large"], "");
    let node = TestNode::start(&toml).await.unwrap();
    let key = node
        .tenant_with_key(tenant("thrifty", &[], &["small"]))
        .await
        .unwrap();
    assert_eq!(chat(&node, &key, "small").await.0, 200);
    let (status, v) = chat(&node, &key, "large").await;
    assert_eq!(status, 403);
    assert_eq!(v["error"]["code"], "model_not_allowed", "{v}");
    assert_eq!(v["error"]["param"], "model");
}

#[tokio::test]
async fn one_replica_of_four_failing_every_request_costs_clients_almost_nothing() {
    let healthy = mock().await;
    let failing = mock().await;
    // The bad replica is listed first: with equal load it is everyone's first choice.
    let mut toml = String::from("[breaker]\nopen_base = \"2s\"\n\n");
    toml.push_str(&provider_toml(
        "replica-bad",
        &failing.base_url(),
        &["m=mock@fail:500"],
        "",
    ));
    for i in 0..3 {
        toml.push_str(&provider_toml(
            &format!("replica-{i}"),
            &healthy.base_url(),
            &["m=mock@tokens:2"],
            "",
        ));
    }
    let node = TestNode::start(&toml).await.unwrap();
    let client = node.client();
    let total = 1000;
    let mut errors = 0;
    let mut tasks = Vec::new();
    for _ in 0..total {
        let req = client
            .post(node.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(chat_body("m", false, ""))
            .send();
        tasks.push(tokio::spawn(async move {
            req.await.map(|r| r.status().as_u16()).unwrap_or(0)
        }));
        if tasks.len() == 8 {
            for t in tasks.drain(..) {
                errors += usize::from(t.await.unwrap() != 200);
            }
        }
    }
    for t in tasks {
        errors += usize::from(t.await.unwrap() != 200);
    }
    let attempts_at_bad = failing.stats.requests.load(SeqCst);
    println!(
        "one of four replicas failing: {errors} of {total} client requests failed ({:.2} %); the bad replica was tried {attempts_at_bad} times",
        errors as f64 * 100.0 / total as f64
    );
    assert!(
        errors * 100 <= total,
        "at most 1 % client-visible errors, got {errors} of {total}"
    );
    assert!(
        (attempts_at_bad as usize) < total / 8,
        "the breaker keeps traffic off the bad replica"
    );
}

#[tokio::test]
async fn auto_picks_a_model_by_complexity() {
    let small = mock().await;
    let big = mock().await;
    let toml = format!(
        "[[aliases]]\nname = \"auto\"\ntrivial = [\"small\"]\nhard = [\"big\", \"small\"]\n\n{}{}",
        provider_toml("s", &small.base_url(), &["small=mock@tokens:1"], ""),
        provider_toml("b", &big.base_url(), &["big=mock@tokens:1"], ""),
    );
    let node = TestNode::start(&toml).await.unwrap();
    let send = |body: String, complexity: Option<&str>| {
        let mut req = node
            .client()
            .post(node.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(c) = complexity {
            req = req.header("x-meridian-complexity", c);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let counts = || {
        (
            small.stats.requests.load(SeqCst),
            big.stats.requests.load(SeqCst),
        )
    };
    // A short question is trivial.
    assert_eq!(send(chat_body("auto", false, ""), None).await, 200);
    assert_eq!(counts(), (1, 0));
    // Tools make it hard; so does a long prompt; moderate borrows the hard tier.
    let tools =
        r#""tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]"#;
    assert_eq!(send(chat_body("auto", false, tools), None).await, 200);
    assert_eq!(counts(), (1, 1));
    let long = format!(
        r#"{{"model":"auto","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "word ".repeat(5_000)
    );
    assert_eq!(send(long, None).await, 200);
    assert_eq!(counts(), (1, 2));
    let code =
        r#"{"model":"auto","messages":[{"role":"user","content":"fix this: ```let x = 1```"}]}"#;
    assert_eq!(send(code.into(), None).await, 200);
    assert_eq!(
        counts(),
        (1, 3),
        "code is moderate, which borrows the hard tier"
    );
    // The header decides when given.
    assert_eq!(
        send(chat_body("auto", false, tools), Some("trivial")).await,
        200
    );
    assert_eq!(counts(), (2, 3));
    assert_eq!(send(chat_body("auto", false, ""), Some("hard")).await, 200);
    assert_eq!(counts(), (2, 4));
    assert_eq!(
        send(chat_body("auto", false, ""), Some("extreme")).await,
        400
    );
    // The hard tier's second model is its fallback.
    drop(big);
    assert_eq!(send(chat_body("auto", false, ""), Some("hard")).await, 200);
    assert_eq!(small.stats.requests.load(SeqCst), 3);
    // `auto` is listed with the real models.
    let models = node.get_json("/v1/models").await.unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["small", "big", "auto"]);
}

#[tokio::test]
async fn a_conversation_stays_on_the_replica_that_has_its_prefix() {
    let replicas = [mock().await, mock().await, mock().await];
    let mut toml = String::new();
    for (i, r) in replicas.iter().enumerate() {
        toml.push_str(&provider_toml(
            &format!("vllm-{i}"),
            &r.base_url(),
            &["llama=mock@tokens:2"],
            "prefix_affinity = true",
        ));
    }
    let node = TestNode::start(&toml).await.unwrap();
    let counts = || -> Vec<u64> {
        replicas
            .iter()
            .map(|r| r.stats.requests.load(SeqCst))
            .collect()
    };
    let mut homes = std::collections::BTreeSet::new();
    for conversation in 0..8 {
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": format!("You are assistant number {conversation}.")}),
            serde_json::json!({"role": "user", "content": "Hello!"}),
        ];
        let mut home = None;
        for turn in 0..4 {
            let before = counts();
            let status = node
                .client()
                .post(node.url("/v1/chat/completions"))
                .json(&serde_json::json!({"model": "llama", "messages": messages}))
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, 200);
            let after = counts();
            let served = (0..3).find(|&i| after[i] > before[i]).unwrap();
            match home {
                None => home = Some(served),
                Some(h) => assert_eq!(served, h, "conversation {conversation}, turn {turn} moved"),
            }
            messages.push(serde_json::json!({"role": "assistant", "content": "tok0 tok1 "}));
            messages
                .push(serde_json::json!({"role": "user", "content": format!("and turn {turn}?")}));
        }
        homes.insert(home.unwrap());
    }
    println!(
        "8 conversations of 4 turns: each stayed on one replica; {} replicas used",
        homes.len()
    );
    assert!(homes.len() >= 2, "conversations spread over the replicas");
}
