//! Circuit breakers on one node (its own single-member cluster): failures trip a breaker through
//! the replicated state, an open breaker takes the provider out of routing, half-open probes
//! close it once the provider is back, and operators can force breakers open, closed or reset;
//! the retry budget bounds the fallbacks an outage brings. (Propagation to other nodes is
//! tested with real processes in `cluster.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::{Duration, Instant};

use meridian_proto::pb::admin as pb;
use meridian_tests::mock::{Flavor, MockOptions, MockUpstream};
use meridian_tests::procs::Admin;
use meridian_tests::{ReservedPort, TestNode, chat_body, provider_toml, retry_later, wait_until};

/// The answer of `call` on an admin API client of `node`.
async fn admin<T>(
    node: &TestNode,
    call: impl AsyncFnOnce(&mut Admin) -> Result<tonic::Response<T>, tonic::Status>,
) -> T {
    let mut admin = node.admin_client().await.unwrap();
    call(&mut admin).await.unwrap().into_inner()
}

async fn breaker(node: &TestNode, provider: &str) -> Option<pb::Breaker> {
    let l = admin(node, async |a| {
        a.list_breakers(pb::ListBreakersRequest {}).await
    })
    .await;
    l.breakers.into_iter().find(|b| b.provider == provider)
}

async fn attempts(node: &TestNode, provider: &str) -> u64 {
    let l = admin(node, async |a| {
        a.list_providers(pb::ListProvidersRequest {}).await
    })
    .await;
    l.providers
        .iter()
        .find(|p| p.id == provider)
        .map(|p| p.requests_total)
        .unwrap()
}

async fn chat(node: &TestNode) -> reqwest::Response {
    node.post_chat(chat_body("m", false, "")).await.unwrap()
}

async fn set(node: &TestNode, provider: &str, action: pb::BreakerAction) -> bool {
    let request = pb::SetBreakerRequest {
        provider: provider.into(),
        action: action as i32,
        reason: String::new(),
    };
    admin(node, async |a| a.set_breaker(request).await)
        .await
        .changed
}

/// A mock vLLM upstream and a node in front of it with `[breaker]` settings `breaker` and one
/// provider per `(id, models, extra)` of `providers`, each at the mock.
async fn node_on_mock(
    breaker: &str,
    providers: &[(&str, &[&str], &str)],
) -> (MockUpstream, TestNode) {
    let mock = MockUpstream::with_flavor(Flavor::Vllm).await.unwrap();
    let mut toml = format!("[breaker]\n{breaker}\n\n");
    for (id, models, extra) in providers {
        toml.push_str(&provider_toml(id, &mock.base_url(), models, extra));
    }
    let node = TestNode::start(&toml).await.unwrap();
    (mock, node)
}

#[tokio::test]
async fn failures_trip_the_breaker_probes_close_it_and_operators_can_force_it() {
    // Nothing listens there until the test starts a server on it.
    let held = ReservedPort::new().unwrap();
    let down = held.addr();
    let healthy = MockUpstream::with_flavor(Flavor::Vllm).await.unwrap();
    let toml = format!(
        "[breaker]\nconsecutive_failures = 3\nopen_base = \"700ms\"\nprobes = 2\n\n{}{}",
        provider_toml(
            "flaky",
            &format!("http://{down}/v1"),
            &["m=mock@tokens:2"],
            ""
        ),
        // In another region, so `flaky` (in the node's own) is always tried first.
        provider_toml(
            "steady",
            &healthy.base_url(),
            &["m=mock@tokens:2"],
            "region = \"elsewhere\""
        ),
    );
    let node = TestNode::start(&toml).await.unwrap();

    // `flaky` refuses connections; every request still succeeds through `steady`, and after
    // three failures in a row the breaker opens.
    let mut sent = 0;
    while breaker(&node, "flaky")
        .await
        .is_none_or(|b| b.state != "open")
    {
        assert_eq!(chat(&node).await.status(), 200, "the fallback serves it");
        sent += 1;
        assert!(sent <= 10, "the breaker should have tripped by now");
    }
    let b = breaker(&node, "flaky").await.unwrap();
    assert_eq!(b.trips, 1);
    assert!(b.reason.contains("3 failures in a row"), "{b:?}");
    println!("tripped after {sent} requests: {b:?}");

    // Open: no attempt reaches `flaky`, so requests no longer pay for a failed attempt.
    let before = attempts(&node, "flaky").await;
    let until = b
        .open_until_unix_ms
        .expect("an open breaker says until when");
    for _ in 0..5 {
        assert_eq!(chat(&node).await.status(), 200);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        now < until,
        "the five requests must run while the breaker is open ({} ms past it)",
        now - until
    );
    assert_eq!(
        attempts(&node, "flaky").await,
        before,
        "no traffic while open"
    );

    // Half-open with `flaky` still down: the probe fails and it opens again, for longer.
    // Within 3 × the 700 ms open period it is waiting out.
    wait_until(
        "a failed probe re-opens it",
        Duration::from_millis(2_100),
        || async {
            let _ = chat(&node).await;
            breaker(&node, "flaky").await.is_some_and(|b| b.trips == 2)
        },
    )
    .await
    .unwrap();
    let b = breaker(&node, "flaky").await.unwrap();
    assert!(b.reason.contains("probe failed"), "{b:?}");
    let open_for = b.open_until_unix_ms.unwrap() - b.since_unix_ms;
    assert!(
        (1_300..=1_500).contains(&open_for),
        "the second open period doubles the first (700 ms): {open_for} ms"
    );

    // `flaky` comes back; once the open period ends, two successful probes close it.
    let _back = MockUpstream::start(MockOptions {
        listen: down,
        flavor: Flavor::Vllm,
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let started = Instant::now();
    // Within 3 × the 1.4 s second open period.
    wait_until("probes close it", Duration::from_millis(4_200), || async {
        assert_eq!(chat(&node).await.status(), 200);
        breaker(&node, "flaky")
            .await
            .is_some_and(|b| b.state == "closed")
    })
    .await
    .unwrap();
    let b = breaker(&node, "flaky").await.unwrap();
    assert_eq!(b.trips, 0, "a close clears the trip count");
    println!(
        "closed by probes {:?} after the provider came back",
        started.elapsed()
    );

    // Operators: force `steady` open → everything goes to `flaky`.
    assert!(set(&node, "steady", pb::BreakerAction::ForceOpen).await);
    let before = attempts(&node, "steady").await;
    for _ in 0..5 {
        assert_eq!(chat(&node).await.status(), 200);
    }
    assert_eq!(attempts(&node, "steady").await, before);
    // Both forced open: nothing to route to, said plainly.
    assert!(set(&node, "flaky", pb::BreakerAction::ForceOpen).await);
    let v = retry_later(chat(&node).await, 503).await;
    assert_eq!(v["error"]["code"], "circuit_open", "{v}");
    // Force closed keeps a provider routable whatever detection sees; reset hands it back.
    assert!(set(&node, "flaky", pb::BreakerAction::ForceClosed).await);
    assert!(set(&node, "steady", pb::BreakerAction::Reset).await);
    assert_eq!(chat(&node).await.status(), 200);
    let b = breaker(&node, "flaky").await.unwrap();
    assert!(b.forced && b.state == "closed", "{b:?}");
    assert!(
        !set(&node, "flaky", pb::BreakerAction::ForceClosed).await,
        "a repeat changes nothing"
    );
}

#[tokio::test]
async fn client_errors_and_a_lone_provider_never_trip_a_breaker() {
    let (_mock, node) = node_on_mock(
        "consecutive_failures = 2",
        &[
            ("a", &["bad=mock@fail:400", "down=mock@fail:500"], ""),
            ("b", &["bad=mock@fail:400"], ""),
        ],
    )
    .await;
    for _ in 0..6 {
        let r = node.post_chat(chat_body("bad", false, "")).await.unwrap();
        assert_eq!(r.status(), 400);
    }
    // `down` has one provider (`a`): ejecting it would eject all of the model's providers.
    for _ in 0..6 {
        let r = node.post_chat(chat_body("down", false, "")).await.unwrap();
        assert_eq!(r.status(), 502);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(breaker(&node, "a").await.is_none(), "400s are the client's");
    assert!(breaker(&node, "b").await.is_none());
    let metrics = node.metrics().await;
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("meridian_breaker_panic_refusals_total "))
        .unwrap();
    assert_ne!(refused, "0", "the lone provider's trips were refused");
}

/// One tenant whose requests fail at a provider (here its requests for a model the provider
/// fails) cannot trip that provider's breaker while another tenant's calls there succeed; once
/// the other tenant's calls fail too, the provider is failing, and it trips.
#[tokio::test]
async fn one_tenants_failures_alone_do_not_trip_a_shared_provider() {
    let (_mock, node) = node_on_mock(
        "consecutive_failures = 3",
        &[
            ("shared", &["good=mock@tokens:2", "bad=mock@fail:502"], ""),
            // A second provider of both models, so that `shared` may be ejected at all.
            (
                "spare",
                &["good=mock@tokens:2", "bad=mock@tokens:2"],
                "region = \"elsewhere\"",
            ),
        ],
    )
    .await;
    let hostile = node
        .tenant_in_tier("hostile", "open", pb::Limits::default())
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let call = |key: &str, model: &str| {
        meridian_tests::chat_as(&client, &node.url(""), key, chat_body(model, false, "")).send()
    };
    let dev = node.api_key.clone().unwrap();
    assert_eq!(call(&dev, "good").await.unwrap().status(), 200);
    // The hostile tenant's calls fail at `shared` (and are answered by `spare`).
    for _ in 0..8 {
        assert_eq!(call(&hostile, "bad").await.unwrap().status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        breaker(&node, "shared")
            .await
            .is_none_or(|b| b.position != pb::BreakerPosition::Open as i32),
        "one tenant's failures alone tripped the shared provider"
    );
    assert_eq!(call(&dev, "good").await.unwrap().status(), 200);
    // Now the other tenant's calls fail there too: the provider is failing for everyone.
    for _ in 0..3 {
        let _ = call(&dev, "bad").await.unwrap();
    }
    // At once: a trip is one local decision and one Raft write.
    wait_until(
        "the shared provider tripped",
        Duration::from_secs(1),
        || async {
            breaker(&node, "shared")
                .await
                .is_some_and(|b| b.position == pb::BreakerPosition::Open as i32)
        },
    )
    .await
    .expect("tripped once two tenants' calls failed");
}

/// A call cut by the request's own deadline (`X-Meridian-Deadline-Ms`, tighter than the
/// provider's timeouts) is the request's doing: 504 `deadline_exceeded`, not retried, and not
/// counted against the provider; the same slow calls cut by the provider's own timeout trip it.
#[tokio::test]
async fn a_request_that_runs_out_of_its_own_deadline_trips_nothing() {
    let (_mock, node) = node_on_mock(
        "consecutive_failures = 2",
        &[
            ("a", &["slow=mock@ttft_ms:1500"], "total_timeout = \"10s\""),
            (
                "timing-out",
                &["tight=mock@ttft_ms:1500"],
                "first_byte_timeout = \"200ms\"",
            ),
            // Second providers, so that either may be ejected at all.
            (
                "spare",
                &["slow=mock@tokens:2", "tight=mock@tokens:2"],
                "region = \"elsewhere\"",
            ),
        ],
    )
    .await;
    for _ in 0..4 {
        let r = node
            .post_chat_with_header(
                "x-meridian-deadline-ms",
                "200",
                chat_body("slow", false, ""),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 504);
        let text = r.text().await.unwrap();
        assert!(text.contains("deadline_exceeded"), "{text}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        breaker(&node, "a").await.is_none(),
        "its own deadline is not the provider's failure"
    );
    // The provider's own first-byte timeout is: two of them trip it.
    for _ in 0..2 {
        let _ = node.post_chat(chat_body("tight", false, "")).await.unwrap();
    }
    // At once: a trip is one local decision and one Raft write.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while breaker(&node, "timing-out").await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the provider's own timeouts never tripped it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// While every provider of a model fails (and no breaker trips), each request would be tried at
/// both; the node's retry budget allows at most a fifth of its requests plus ten extra attempts
/// per 10-second window, so the providers see far fewer than twice the requests.
#[tokio::test]
async fn the_retry_budget_bounds_the_fallbacks_an_outage_brings() {
    let started = Instant::now();
    let (mock, node) = node_on_mock(
        "consecutive_failures = 1000000\nmin_calls = 1000000",
        &[
            ("a", &["m=mock@fail:503"], ""),
            ("b", &["m=mock@fail:503"], ""),
        ],
    )
    .await;
    const N: u64 = 200;
    for _ in 0..N {
        let resp = chat(&node).await;
        assert_eq!(resp.status(), 503);
        let _ = resp.bytes().await;
    }
    let elapsed = started.elapsed();
    let sent = mock
        .stats
        .requests
        .load(std::sync::atomic::Ordering::SeqCst);
    let windows = elapsed.as_secs() / 10 + 1;
    println!(
        "retry budget: {N} requests, {sent} upstream attempts in {elapsed:?} ({windows} budget window(s))"
    );
    // The budget's windows start with the node: every window this run touched may grant ten.
    let bound = N + N / 5 + 10 * windows;
    assert!(sent > N, "no fallback was made at all: {sent}");
    assert!(
        sent <= bound,
        "{sent} upstream attempts for {N} requests (bound {bound}; {} without a budget)",
        2 * N
    );
    assert!(
        attempts(&node, "a").await + attempts(&node, "b").await == sent,
        "the providers' own counts agree"
    );
}
