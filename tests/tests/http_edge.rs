//! The HTTP/SSE edge end to end: a real node on loopback in front of the mock upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use futures::StreamExt;
use meridian_proto::pb::admin as pb;
use meridian_tests::json_api::error_saying;
use meridian_tests::mock::{Flavor, MockOptions, MockUpstream};
use meridian_tests::{
    TestNode, chat_as, chat_body, limit, node_with_mock, provider_toml, provider_toml_kind,
    retry_later, sse_chunks, sse_events, tenant, tier, wait_until,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A mock of `flavor` and a node in front of it (provider `mock`): see [`node_with_mock`].
async fn setup(
    flavor: Flavor,
    models: &[&str],
    provider_extra: &str,
    node_extra: &str,
) -> (MockUpstream, TestNode) {
    node_with_mock(flavor, models, provider_extra, node_extra)
        .await
        .expect("mock and node start")
}

/// [`setup`] of a vLLM-flavoured mock serving `models`, with `node_extra` (sections of the
/// node's configuration).
async fn setup_with_node_config(models: &[&str], node_extra: &str) -> (MockUpstream, TestNode) {
    setup(Flavor::Vllm, models, "", node_extra).await
}

/// [`setup`] of a vLLM-flavoured mock serving `models`, with `provider_extra` in the provider's
/// section.
async fn setup_with_provider_config(
    models: &[&str],
    provider_extra: &str,
) -> (MockUpstream, TestNode) {
    setup(Flavor::Vllm, models, provider_extra, "").await
}

/// [`setup`] of a node of the default flavour and model on a clock with `needed` left in its
/// minute (per-minute limits must not roll over under the test).
async fn setup_within_a_minute(needed: Duration, node_extra: &str) -> (MockUpstream, TestNode) {
    let clock = meridian_tests::clock_inside_one_minute(needed);
    meridian_tests::node_with_mock_on(Flavor::Vllm, &["mock"], "", node_extra, clock)
        .await
        .expect("mock and node start")
}

/// An OpenAI mock that requires the provider key `key`.
async fn openai_mock_with_key(key: &str) -> MockUpstream {
    MockUpstream::start(MockOptions {
        flavor: Flavor::OpenAi,
        api_key: Some(key.into()),
        ..MockOptions::default()
    })
    .await
    .expect("mock starts")
}

async fn post(node: &TestNode, body: String) -> reqwest::Response {
    node.post_chat(body).await.expect("request sent")
}

fn content(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[tokio::test]
async fn non_streaming_chat_returns_the_completion_and_usage() {
    let (m, n) = setup(Flavor::OpenAi, &["mock"], "", "").await;
    let resp = post(&n, chat_body("mock", false, "")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(m.stats.completed.load(SeqCst), 1);
}

#[tokio::test]
async fn streaming_chat_is_relayed_exactly_and_always_metered() {
    for flavor in [Flavor::OpenAi, Flavor::Vllm] {
        let (m, n) = setup(flavor, &["mock"], "", "").await;
        let resp = post(&n, chat_body("mock", true, "")).await;
        assert_eq!(resp.status(), 200);
        let h = resp.headers();
        assert_eq!(h["content-type"], "text/event-stream");
        assert_eq!(h["cache-control"], "no-cache");
        assert_eq!(h["x-accel-buffering"], "no");
        let body = resp.bytes().await.expect("body");
        let (chunks, done) = sse_chunks(&body);
        assert!(done, "{flavor:?}: ends with [DONE]");
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(content(&chunks), "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 ");
        assert_eq!(
            chunks.last().expect("chunks")["choices"][0]["finish_reason"],
            "stop"
        );
        assert!(
            chunks
                .iter()
                .all(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty())),
            "{flavor:?}: no usage chunk unless the client asks"
        );
        assert_eq!(
            m.stats.usage_requested.load(SeqCst),
            1,
            "we always ask upstream for usage"
        );

        let resp = post(
            &n,
            chat_body("mock", true, r#""stream_options":{"include_usage":true}"#),
        )
        .await;
        let (chunks, done) = sse_chunks(&resp.bytes().await.expect("body"));
        assert!(done);
        let last = chunks.last().expect("chunks");
        assert_eq!(last["choices"].as_array().map(Vec::len), Some(0));
        assert_eq!(last["usage"]["completion_tokens"], 8, "{flavor:?}");
        assert_eq!(
            last["usage"]["total_tokens"],
            last["usage"]["prompt_tokens"].as_u64().unwrap_or(0) + 8
        );
    }
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let (_m, n) = setup(Flavor::Vllm, &["mock"], "", "").await;
    let resp = n
        .post_chat_with_header(
            "x-request-id",
            "trace-abc-123",
            chat_body("mock", false, ""),
        )
        .await
        .expect("request sent");
    assert_eq!(resp.headers()["x-request-id"], "trace-abc-123");
    let resp = post(&n, chat_body("nope", false, "")).await;
    assert_eq!(
        resp.headers()["x-request-id"].len(),
        32,
        "generated even on errors"
    );
}

#[tokio::test]
async fn bad_input_gets_a_precise_openai_error_never_a_5xx() {
    let (m, n) = setup_with_node_config(&["mock"], "[http]\nmax_body_bytes = 2048").await;
    let big = format!(
        r#"{{"model":"mock","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(4096)
    );
    let cases: Vec<(String, u16, Option<&str>)> = vec![
        (big, 413, None),
        ("{not json".into(), 400, None),
        ("[]".into(), 400, None),
        (
            r#"{"model":"mock","messages":"hi"}"#.into(),
            400,
            Some("messages"),
        ),
        (
            r#"{"model":"mock","messages":[]}"#.into(),
            400,
            Some("messages"),
        ),
        (r#"{"model":"mock"}"#.into(), 400, Some("messages")),
        (
            chat_body("mock", false, r#""temperature":3"#),
            400,
            Some("temperature"),
        ),
        (
            chat_body("mock", false, r#""max_tokens":0"#),
            400,
            Some("max_tokens"),
        ),
        (
            chat_body("mock", false, r#""top_p":"high""#),
            400,
            Some("top_p"),
        ),
        (
            r#"{"model":"mock","messages":[{"role":"robot","content":"x"}]}"#.into(),
            400,
            Some("messages[0].role"),
        ),
        (chat_body("unknown-model", false, ""), 404, Some("model")),
    ];
    for (body, status, param) in cases {
        let resp = post(&n, body.clone()).await;
        let short = &body[..body.len().min(80)];
        assert_eq!(resp.status().as_u16(), status, "{short}");
        assert_eq!(resp.headers()["x-should-retry"], "false", "{short}");
        let v: Value = resp.json().await.expect("OpenAI error body");
        let err = &v["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{short}: {v}"
        );
        assert!(err["type"].is_string(), "{short}: {v}");
        assert!(
            err.get("code").is_some() && err.get("param").is_some(),
            "{short}: {v}"
        );
        if let Some(param) = param {
            assert_eq!(err["param"], param, "{short}: {v}");
            assert!(
                err["message"].as_str().is_some_and(|m| m.contains(param)),
                "{short}: {v}"
            );
        }
    }
    let resp = n.get("/v1/chat/completions").await.expect("sent");
    assert_eq!(resp.status(), 405);
    let resp = n.get("/v2/nothing").await.expect("sent");
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["code"], "unknown_url");
    assert_eq!(
        m.stats.requests.load(SeqCst),
        0,
        "no bad request reached the upstream"
    );
}

#[tokio::test]
async fn upstream_failures_before_the_first_byte_map_to_statuses() {
    let models = [
        "mock@fail:400",
        "mock@fail:500",
        "mock@fail:429",
        "mock@fail:503",
        "mock@ttft_ms:3000",
    ];
    let (_m, n) = setup_with_provider_config(&models, "first_byte_timeout = \"200ms\"").await;
    let cases = [
        ("mock@fail:400", 400, false),
        ("mock@fail:500", 502, false),
        ("mock@fail:429", 503, true),
        ("mock@fail:503", 503, true),
        ("mock@ttft_ms:3000", 504, true),
    ];
    for (model, status, retry_after) in cases {
        for stream in [false, true] {
            let resp = post(&n, chat_body(model, stream, "")).await;
            assert_eq!(resp.status().as_u16(), status, "{model} stream={stream}");
            assert_eq!(
                resp.headers().contains_key("retry-after"),
                retry_after,
                "{model}"
            );
            let v: Value = resp.json().await.expect("json error");
            assert!(v["error"]["message"].is_string(), "{model}: {v}");
        }
    }
    // An upstream that refuses connections.
    let held = meridian_tests::ReservedPort::new().expect("a port");
    let dead = held.dead_url();
    let n = TestNode::start(&provider_toml("dead", &dead, &["m"], ""))
        .await
        .expect("node");
    let resp = post(&n, chat_body("m", false, "")).await;
    assert_eq!(resp.status(), 502);
}

#[tokio::test]
async fn failures_after_the_first_byte_end_with_an_error_event_and_no_done() {
    for flavor in [Flavor::OpenAi, Flavor::Vllm] {
        // Small inter-token delays so the first tokens are on the wire before the fault, as
        // with a real server.
        let models = [
            "mock@fail_after:3;itl_ms:10",
            "mock@close_after:2;itl_ms:10",
            "mock@stall_after:2;itl_ms:10",
        ];
        let (_m, n) = setup(flavor, &models, "idle_timeout = \"300ms\"", "").await;
        for (model, tokens) in [(models[0], 3), (models[1], 2), (models[2], 2)] {
            let started = Instant::now();
            let resp = post(&n, chat_body(model, true, "")).await;
            assert_eq!(resp.status(), 200, "{model}");
            let body = resp.bytes().await.expect("the stream ends, never hangs");
            if model == models[2] {
                // The stall is ended by the 300 ms idle timeout, not by anything later.
                let took = started.elapsed();
                assert!(
                    took >= Duration::from_millis(300) && took < Duration::from_millis(900),
                    "{flavor:?}: a stalled stream ended after {took:?}"
                );
            }
            let (chunks, done) = sse_chunks(&body);
            assert!(
                !done,
                "{flavor:?} {model}: a truncated answer never ends with [DONE]"
            );
            let last = chunks.last().expect("chunks");
            assert!(last["error"]["message"].is_string(), "{model}: {last}");
            assert!(last["error"]["type"].is_string(), "{model}: {last}");
            let expected: String = (0..tokens).map(|i| format!("tok{i} ")).collect();
            assert_eq!(content(&chunks), expected, "{model}");
        }
    }
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_call() {
    let (m, n) = setup(Flavor::Vllm, &["mock@tokens:200;itl_ms:20"], "", "").await;
    let resp = post(&n, chat_body("mock@tokens:200;itl_ms:20", true, "")).await;
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("bytes");
    assert!(first.starts_with(b"data: "));
    drop(body);
    // At once: the gRPC edge and the mesh are held to the same second.
    m.wait_aborted(1, Duration::from_secs(1))
        .await
        .expect("upstream call cancelled");
    assert_eq!(m.stats.completed.load(SeqCst), 0);
    wait_until("the slot to be freed", Duration::from_secs(1), || async {
        n.gateway.in_flight() == 0
    })
    .await
    .expect("slot freed");
}

#[tokio::test]
async fn a_full_queue_is_503_and_a_missed_queue_deadline_is_504() {
    let slow = "mock@tokens:100;itl_ms:20";
    let (_m, n) = setup_with_provider_config(
        &[slow, "mock"],
        "max_concurrency = 1\nqueue_capacity = 1\nqueue_timeout = \"1s\"",
    )
    .await;
    // Hold the only slot.
    let holder = post(&n, chat_body(slow, true, "")).await;
    assert_eq!(holder.status(), 200);
    // The second waits in the queue and misses its deadline: 504.
    let queued = tokio::spawn(n.chat_request().body(chat_body("mock", false, "")).send());
    wait_until("one queued request", Duration::from_secs(5), || async {
        n.gateway.providers()[0].queued == 1
    })
    .await
    .expect("queued");
    // The third finds the queue full: 503 with Retry-After.
    let full = post(&n, chat_body("mock", false, "")).await;
    let v = retry_later(full, 503).await;
    assert_eq!(v["error"]["code"], "queue_full");

    let timed_out = queued.await.expect("task").expect("response");
    let v = retry_later(timed_out, 504).await;
    assert_eq!(v["error"]["code"], "queue_timeout");
    drop(holder);
}

#[tokio::test]
async fn hostile_content_cannot_break_the_event_framing() {
    let (_m, n) = setup(
        Flavor::OpenAi,
        &["mock@content:cr;tokens:3", "mock@content:done;tokens:3"],
        "",
        "",
    )
    .await;
    let resp = post(&n, chat_body("mock@content:cr;tokens:3", true, "")).await;
    let (chunks, done) = sse_chunks(&resp.bytes().await.expect("body"));
    assert!(done);
    assert_eq!(content(&chunks), "line0\r\nline1\r\nline2\r\n");
    let resp = post(&n, chat_body("mock@content:done;tokens:3", true, "")).await;
    let (chunks, done) = sse_chunks(&resp.bytes().await.expect("body"));
    assert!(done);
    assert_eq!(content(&chunks), "\n\ndata: [DONE]\n\n".repeat(3));
}

#[tokio::test]
async fn heartbeats_flow_while_the_upstream_is_silent() {
    let model = "mock@tokens:2;itl_ms:400";
    let (_m, n) = setup_with_node_config(&[model], "[http]\nsse_heartbeat = \"50ms\"").await;
    let resp = post(&n, chat_body(model, true, "")).await;
    let body = resp.bytes().await.expect("body");
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains(": ping\n\n"), "{text}");
    let (chunks, done) = sse_chunks(&body);
    assert!(done);
    assert_eq!(content(&chunks), "tok0 tok1 ");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let (_m, n) =
        setup_with_node_config(&["mock"], "[http]\nheader_read_timeout = \"300ms\"").await;
    let mut conn = tokio::net::TcpStream::connect(n.http)
        .await
        .expect("connect");
    conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let started = Instant::now();
    let read = tokio::time::timeout(Duration::from_millis(900), conn.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the node closes a slow-header connection within 3 × its 300 ms header timeout"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed by the timeout, not at once: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn models_health_and_readiness() {
    let (_m, n) = setup(Flavor::Vllm, &["mock", "alias=mock"], "", "").await;
    let v = n.get_json("/v1/models").await.expect("models");
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["mock", "alias"]);
    assert_eq!(v["data"][0]["object"], "model");
    let resp = n.get("/healthz").await.expect("sent");
    assert_eq!(resp.status(), 200);
    let resp = n.get("/readyz").await.expect("sent");
    assert_eq!(resp.status(), 200);
    let ready: Value = resp.json().await.expect("json");
    assert_eq!(ready["cluster"]["quorum"], "ok", "{ready}");
    // An alias reaches the upstream under the upstream's own name.
    let resp = post(&n, chat_body("alias", false, "")).await;
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["model"], "mock");
    // Metrics: cluster health and the provider's counters, in Prometheus text format.
    let resp = n.get("/metrics").await.expect("sent");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()[http::header::CONTENT_TYPE]
            .to_str()
            .is_ok_and(|t| t.starts_with("text/plain"))
    );
    let text = resp.text().await.expect("text");
    for line in [
        "meridian_cluster_quorum 1",
        "meridian_cluster_is_leader 1",
        "meridian_cluster_members 1",
        "meridian_provider_requests_total{provider=\"mock\"} 1",
        "meridian_quota_no_quorum_denials_total 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
}

#[tokio::test]
async fn shutdown_refuses_new_requests_and_lets_streams_finish() {
    let model = "mock@tokens:15;itl_ms:20";
    let (_m, mut n) = setup_with_node_config(&[model], "[shutdown]\ndrain_timeout = \"10s\"").await;
    let resp = post(&n, chat_body(model, true, "")).await;
    assert_eq!(resp.status(), 200);
    let drained = n.begin_shutdown();
    wait_until("draining", Duration::from_secs(5), || async {
        n.gateway.is_draining()
    })
    .await
    .expect("draining");
    // New work is refused: either the listener is gone or the request gets a 503.
    match n
        .chat_request()
        .body(chat_body(model, false, ""))
        .send()
        .await
    {
        Ok(r) => assert_eq!(r.status(), 503),
        Err(e) => assert!(e.is_connect() || e.is_request(), "{e}"),
    }
    let (chunks, done) = sse_chunks(&resp.bytes().await.expect("the in-flight stream finishes"));
    assert!(done);
    assert_eq!(content(&chunks).split_whitespace().count(), 15);
    drained.await.expect("task").expect("clean shutdown");
}

#[tokio::test]
async fn the_total_timeout_ends_a_long_stream_with_an_error_event() {
    let model = "mock@tokens:500;itl_ms:10";
    let (m, n) = setup_with_provider_config(&[model], "total_timeout = \"500ms\"").await;
    let started = Instant::now();
    let resp = post(&n, chat_body(model, true, "")).await;
    assert_eq!(resp.status(), 200);
    let (chunks, done) = sse_chunks(&resp.bytes().await.expect("body"));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1_500),
        "cut by the 500 ms total timeout after {took:?}"
    );
    assert!(!done);
    let last = chunks.last().expect("chunks");
    assert_eq!(last["error"]["type"], "timeout_error", "{last}");
    assert!(
        chunks.len() > 2 && chunks.len() < 500,
        "cut short: {}",
        chunks.len()
    );
    m.wait_aborted(1, Duration::from_secs(1))
        .await
        .expect("aborted upstream");
}

#[tokio::test]
async fn upstream_connections_are_reused_and_replaced_when_the_upstream_closes_them() {
    let (m, n) = setup(Flavor::Vllm, &["mock"], "", "").await;
    let addr = m.addr;
    for stream in [true, false, true, false, true] {
        let resp = post(&n, chat_body("mock", stream, "")).await;
        assert_eq!(resp.status(), 200);
        resp.bytes().await.expect("body");
    }
    assert_eq!(m.stats.requests.load(SeqCst), 5);
    assert_eq!(
        m.stats.connections.load(SeqCst),
        1,
        "one keep-alive connection for all"
    );

    // The upstream restarts on the same address: its idle connection to us is closed.
    m.stop().await;
    let m = MockUpstream::start(MockOptions {
        listen: addr,
        ..MockOptions::default()
    })
    .await
    .expect("mock restarts");
    let resp = post(&n, chat_body("mock", false, "")).await;
    assert_eq!(
        resp.status(),
        200,
        "a stale pooled connection is replaced, not used"
    );
    assert_eq!(m.stats.requests.load(SeqCst), 1);
}

#[tokio::test]
async fn an_upstream_that_never_completes_the_handshake_hits_the_connect_timeout() {
    // A listener that never accepts, with its backlog already full: the kernel drops further
    // SYNs, so a connect hangs, as it does towards a silently dead host.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(1).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => fillers.push(s),
            _ => break, // the queue is full
        }
    }
    let base = format!("http://{addr}/v1");
    let n = TestNode::start(&provider_toml(
        "blackhole",
        &base,
        &["m"],
        "connect_timeout = \"300ms\"",
    ))
    .await
    .expect("node");
    let started = Instant::now();
    let resp = post(&n, chat_body("m", false, "")).await;
    assert_eq!(resp.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "bounded by the 300 ms connect timeout (about 3 × it at most)"
    );
    error_saying(resp, "connect").await;
    drop(listener);
    drop(fillers);
}

#[tokio::test]
async fn api_keys_are_required_checked_and_revocable() {
    let (_m, n) = setup(Flavor::Vllm, &["mock"], "", "").await;
    let bare = reqwest::Client::new();
    let call = |key: Option<(&'static str, String)>| {
        let mut req = bare
            .post(n.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(chat_body("mock", false, ""));
        if let Some((header, value)) = key {
            req = req.header(header, value);
        }
        async move { req.send().await.expect("sent") }
    };
    let refused = |resp: reqwest::Response, code: &'static str| async move {
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["x-should-retry"], "false");
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["error"]["type"], "authentication_error", "{v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };

    refused(call(None).await, "missing_api_key").await;
    refused(
        call(Some(("authorization", "Bearer sk-not-ours".into()))).await,
        "malformed_api_key",
    )
    .await;
    let forged = format!("mk_{}_{}", "a".repeat(12), "b".repeat(64));
    let message = refused(
        call(Some(("authorization", format!("Bearer {forged}")))).await,
        "invalid_api_key",
    )
    .await;
    assert!(
        !message.contains(&"b".repeat(64)),
        "the key is never echoed"
    );
    let resp = bare.get(n.url("/v1/models")).send().await.expect("sent");
    assert_eq!(resp.status(), 401, "listing models needs a key too");

    // A key made through the admin API works in either header, then stops working once revoked.
    let mut admin = n.admin_client().await.expect("admin");
    let key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            tenant: "dev".into(),
            label: "test".into(),
        })
        .await
        .expect("created")
        .into_inner();
    assert!(key.secret.starts_with(&format!("mk_{}_", key.key_id)));
    let ok = call(Some(("x-api-key", key.secret.clone()))).await;
    assert_eq!(ok.status(), 200);
    let ok = call(Some(("authorization", format!("Bearer {}", key.secret)))).await;
    assert_eq!(ok.status(), 200);
    let listed = admin
        .list_api_keys(pb::ListApiKeysRequest {
            tenant: "dev".into(),
            ..Default::default()
        })
        .await
        .expect("listed")
        .into_inner();
    assert_eq!(listed.keys.len(), 2, "the development key and this one");
    admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: key.key_id.clone(),
        })
        .await
        .expect("revoked");
    // The revoke is applied before the admin call returns on a single node.
    refused(
        call(Some(("x-api-key", key.secret.clone()))).await,
        "revoked_api_key",
    )
    .await;
    let err = admin
        .create_api_key(pb::CreateApiKeyRequest {
            tenant: "nobody".into(),
            label: String::new(),
        })
        .await
        .expect_err("no such tenant");
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn limits_answer_429_naming_the_limit_with_rate_limit_headers() {
    let (m, n) = setup_within_a_minute(Duration::from_secs(10), "").await;
    let limits = pb::Limits {
        tokens_per_minute: Some(1_000),
        ..limit::requests_per_minute(1_000)
    };
    let key = n
        .tenant_in_tier("acme", "small", limits)
        .await
        .expect("tier, tenant and key");
    let client = reqwest::Client::new();
    let send = |body: String| chat_as(&client, &n.url(""), &key, body).send();
    // The mock answers 8 completion tokens; each request reserves its prompt + 100.
    let resp = send(chat_body("mock", false, r#""max_tokens":100"#))
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    for h in [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ] {
        assert!(
            resp.headers().contains_key(h),
            "no {h}: {:?}",
            resp.headers()
        );
    }
    assert_eq!(resp.headers()["x-ratelimit-limit-tokens"], "1000");
    let mut served = 1;
    let refused = loop {
        let resp = send(chat_body("mock", false, r#""max_tokens":100"#))
            .await
            .expect("sent");
        if resp.status() == 429 {
            break resp;
        }
        assert_eq!(resp.status(), 200);
        served += 1;
        assert!(served < 200, "never limited");
    };
    // Actual use is ~12 tokens a request, so reservations are settled and many more than
    // 1000 / 105 requests fit.
    assert!(
        served > 20,
        "only {served} served: reservations are not settled"
    );
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.headers()["x-ratelimit-limit-tokens"], "1000");
    assert!(refused.headers().get("x-should-retry").is_none());
    let v: Value = refused.json().await.expect("json");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(v["error"]["code"], "tokens_per_minute");

    // A request that can never fit says so, and that a retry will not help.
    let resp = send(chat_body("mock", false, r#""max_tokens":5000"#))
        .await
        .expect("sent");
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["param"], "max_tokens");
    // The mock's own count matches what was served.
    let seen = m
        .stats
        .completion_tokens
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(seen, served * 8);
}

#[tokio::test]
async fn jwt_callers_are_checked_and_limited_by_their_tier_claim() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let m = MockUpstream::with_flavor(Flavor::Vllm)
        .await
        .expect("mock starts");
    let secret = "a-shared-hs256-secret-for-this-test-only";
    let toml = format!(
        "[jwt]\nissuer = \"https://idp.example\"\naudience = \"meridian\"\nhs256_secret_env = \"TEST_JWT_SECRET\"\ntier_claim = \"tier\"\n{}",
        provider_toml("mock", &m.base_url(), &["mock"], "")
    );
    let clock = meridian_tests::clock_inside_one_minute(Duration::from_secs(10));
    let n = TestNode::start_on(
        &toml,
        vec![("TEST_JWT_SECRET".into(), secret.into())],
        clock,
    )
    .await
    .expect("node");
    n.put_tier(tier("tiny", limit::requests_per_minute(2)))
        .await
        .expect("tier");
    let now = meridian_tests::unix_secs();
    let token = |exp: u64, aud: &str| {
        encode(
            &Header::default(),
            &serde_json::json!({"iss": "https://idp.example", "aud": aud, "exp": exp,
                                "sub": "user-7", "tenant": "partner-co", "tier": "tiny"}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("signed")
    };
    let client = reqwest::Client::new();
    let call = |t: String| chat_as(&client, &n.url(""), &t, chat_body("mock", false, "")).send();
    let good = token(now + 300, "meridian");
    assert_eq!(call(good.clone()).await.expect("sent").status(), 200);
    assert_eq!(call(good.clone()).await.expect("sent").status(), 200);
    // The tier claim's limit applies: 2 requests a minute.
    let third = call(good).await.expect("sent");
    assert_eq!(third.status(), 429);
    let v: Value = third.json().await.expect("json");
    assert_eq!(v["error"]["code"], "requests_per_minute");
    for (t, code) in [
        (token(now - 600, "meridian"), "expired_token"),
        (token(now + 300, "elsewhere"), "invalid_audience"),
    ] {
        let resp = call(t).await.expect("sent");
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["error"]["code"], code, "{v}");
    }
    // API keys keep working alongside.
    let resp = n
        .chat_request()
        .body(chat_body("mock", false, ""))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_request_that_cannot_start_before_its_deadline_is_refused_at_once() {
    let slow = "mock@ttft_ms:300";
    let (_m, n) = setup_with_provider_config(
        &[slow],
        "max_concurrency = 1\nqueue_capacity = 8\nqueue_timeout = \"10s\"",
    )
    .await;
    let with_deadline = async |ms: &'static str| {
        n.post_chat_with_header("x-meridian-deadline-ms", ms, chat_body(slow, false, ""))
            .await
            .expect("request sent")
    };
    let bad = with_deadline("soon").await;
    assert_eq!(bad.status(), 400);
    let v: Value = bad.json().await.expect("json");
    assert_eq!(v["error"]["param"], "X-Meridian-Deadline-Ms");
    // Two calls teach the node how long this provider holds a slot (~300 ms).
    for _ in 0..2 {
        assert_eq!(post(&n, chat_body(slow, false, "")).await.status(), 200);
    }
    // One call holds the only slot; a request that must start within 100 ms cannot.
    let holder = tokio::spawn(n.chat_request().body(chat_body(slow, false, "")).send());
    wait_until("the slot to be taken", Duration::from_secs(5), || async {
        n.gateway.providers()[0].in_flight == 1
    })
    .await
    .expect("slot taken");
    let started = Instant::now();
    let resp = with_deadline("100").await;
    let took = started.elapsed();
    let v = retry_later(resp, 504).await;
    assert_eq!(v["error"]["code"], "deadline_unreachable", "{v}");
    assert!(
        took < Duration::from_millis(100),
        "refused at once, not late: {took:?}"
    );
    assert_eq!(holder.await.expect("task").expect("sent").status(), 200);
}

#[tokio::test]
async fn features_users_and_daily_cost_have_their_own_limits() {
    // The mock answers 8 completion tokens; $1,000 per million output tokens is 8,000 µ$.
    let prices =
        "[[prices]]\nmodel = \"mock\"\ninput_usd_per_mtok = 0.0\noutput_usd_per_mtok = 1000.0\n";
    let (_m, n) = setup_within_a_minute(Duration::from_secs(30), prices).await;
    let limits = limit::cost_per_day_micro_usd(1_000_000);
    n.put_tier(pb::Tier {
        per_user: Some(limit::requests_per_minute(2)),
        ..tier("paid", limits)
    })
    .await
    .expect("tier");
    let mut features = std::collections::HashMap::new();
    features.insert("search".to_owned(), limit::requests_per_minute(1));
    let key = n
        .tenant_with_key(pb::Tenant {
            features,
            ..tenant("shop", "paid")
        })
        .await
        .expect("tenant and key");
    let client = reqwest::Client::new();
    let call = |feature: Option<&'static str>, user: &'static str| {
        let body = chat_body("mock", false, &format!(r#""max_tokens":8,"user":"{user}""#));
        let mut req = chat_as(&client, &n.url(""), &key, body);
        if let Some(f) = feature {
            req = req.header("x-meridian-feature", f);
        }
        async move {
            let resp = req.send().await.expect("sent");
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or_default();
            (
                status,
                v["error"]["code"].as_str().unwrap_or_default().to_owned(),
            )
        }
    };
    assert_eq!(call(Some("search"), "ann").await.0, 200);
    let second = call(Some("search"), "bob").await;
    assert_eq!(
        second,
        (429, "requests_per_minute".to_owned()),
        "the feature allows one request a minute, whoever sends it"
    );
    assert_eq!(
        call(None, "ann").await.0,
        200,
        "other work is not held back"
    );
    assert_eq!(
        call(None, "ann").await,
        (429, "requests_per_minute".to_owned()),
        "ann has used her 2 requests"
    );
    assert_eq!(call(None, "bob").await.0, 200);
    let bad = chat_as(&client, &n.url(""), &key, chat_body("mock", false, ""))
        .header("x-meridian-feature", "no spaces")
        .send()
        .await
        .expect("sent");
    assert_eq!(bad.status(), 400);
    // Cost: each request costs 8,000 µ$, the day allows 1,000,000; the roll-up records it.
    let mut users = 0;
    let code = loop {
        let user: &'static str = Box::leak(format!("user-{users}").into_boxed_str());
        let (status, code) = call(None, user).await;
        if status != 200 {
            break code;
        }
        users += 1;
        assert!(users < 400, "cost never limited");
    };
    assert_eq!(code, "cost_per_day");
    assert!(
        (100..=125).contains(&(users + 3)),
        "{} requests at 8,000 µ$ against 1,000,000 µ$",
        users + 3
    );
    // Roll-ups reach the replicated state within a flush or two.
    wait_until("the usage roll-up", Duration::from_secs(5), || async {
        let Some(state) = n.gateway.cluster_state() else {
            return false;
        };
        let cost: u64 = state
            .usage
            .values()
            .filter_map(|t| t.get("shop"))
            .flat_map(|day| day.rows())
            .map(|(_, t)| t.cost_micro_usd)
            .sum();
        cost >= 8_000 * (users + 3)
    })
    .await
    .expect("usage rolled up with its cost");
}

#[tokio::test]
async fn a_failure_before_the_first_byte_falls_back_to_the_next_provider() {
    let m = MockUpstream::with_flavor(Flavor::Vllm)
        .await
        .expect("mock starts");
    let two = |first: &str, second: &str| {
        format!(
            "{}{}",
            provider_toml("a", &m.base_url(), &[&format!("m={first}")], ""),
            // In another region: `a`, in the node's own, is always tried first.
            provider_toml(
                "b",
                &m.base_url(),
                &[&format!("m={second}")],
                "region = \"elsewhere\""
            )
        )
    };
    let n = TestNode::start(&two("mock@fail:503", "mock"))
        .await
        .expect("node");
    // Provider a (first in order) fails with 503; b answers. The client sees one success.
    for stream in [false, true] {
        let resp = post(&n, chat_body("m", stream, "")).await;
        assert_eq!(resp.status(), 200, "stream={stream}");
        let _ = resp.bytes().await.expect("body");
    }
    let failed = m.stats.failed.load(std::sync::atomic::Ordering::SeqCst);
    let completed = m.stats.completed.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        (failed, completed),
        (2, 2),
        "each request: a failed, then b served"
    );
    let a = n.provider("a").expect("a");
    assert_eq!(a.failures_total, 2, "every attempt is recorded");

    // All candidates down: 503, naming it, with Retry-After.
    let n = TestNode::start(&two("mock@fail:503", "mock@fail:500"))
        .await
        .expect("node");
    let resp = post(&n, chat_body("m", false, "")).await;
    let v = retry_later(resp, 503).await;
    assert_eq!(v["error"]["code"], "all_providers_failed");

    // A client error is not retried elsewhere.
    let n = TestNode::start(&two("mock@fail:400", "mock"))
        .await
        .expect("node");
    let before = m.stats.completed.load(std::sync::atomic::Ordering::SeqCst);
    let resp = post(&n, chat_body("m", false, "")).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        m.stats.completed.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "b was not tried"
    );
}

#[tokio::test]
async fn deterministic_answers_are_cached_per_tenant_and_hits_obey_the_tenants_rules() {
    let (m, n) = setup_within_a_minute(Duration::from_secs(10), "").await;
    n.put_tier(tier("three", limit::requests_per_minute(3)))
        .await
        .expect("tier");
    let mut keys = Vec::new();
    for tenant in ["t1", "t2"] {
        keys.push(
            n.tenant_with_key(meridian_tests::tenant(tenant, "three"))
                .await
                .expect("tenant and key"),
        );
    }
    let client = reqwest::Client::new();
    let call = |key: &str, stream: bool, extra: &str| {
        chat_as(&client, &n.url(""), key, chat_body("mock", stream, extra)).send()
    };
    let served = || m.stats.completed.load(std::sync::atomic::Ordering::SeqCst);
    let det = r#""temperature":0"#;
    let first = call(&keys[0], false, det).await.expect("sent");
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-meridian-cache"], "miss");
    let first_body: Value = first.json().await.expect("json");
    assert_eq!(served(), 1);
    // Again: from the cache, free of tokens, but a request all the same.
    let again = call(&keys[0], false, det).await.expect("sent");
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["x-meridian-cache"], "hit");
    assert_eq!(again.json::<Value>().await.expect("json"), first_body);
    // As a stream: the same answer, replayed as SSE.
    let streamed = call(
        &keys[0],
        true,
        r#""temperature":0,"stream_options":{"include_usage":true}"#,
    )
    .await
    .expect("sent");
    assert_eq!(streamed.headers()["x-meridian-cache"], "hit");
    let text = streamed.text().await.expect("text");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains(r#""usage""#), "{text}");
    let content = first_body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(text.contains(content), "{text}");
    assert_eq!(served(), 1, "no provider call for hits");
    // A hit counts against the tenant's requests a minute: the fourth is refused.
    let over = call(&keys[0], false, det).await.expect("sent");
    assert_eq!(over.status(), 429, "hits count as requests");
    // Another tenant never sees it.
    let other = call(&keys[1], false, det).await.expect("sent");
    assert_eq!(other.headers()["x-meridian-cache"], "miss");
    assert_eq!(served(), 2);
    // Non-deterministic requests are not cached.
    let random = call(&keys[1], false, "").await.expect("sent");
    assert!(random.headers().get("x-meridian-cache").is_none());
    assert_eq!(random.status(), 200);
    // A tenant no longer allowed the model is not served it from the cache either.
    n.tenant_with_key(pb::Tenant {
        models: vec!["another".into()],
        ..tenant("t2", "three")
    })
    .await
    .expect("tenant");
    let barred = wait_until("t2's new rules", Duration::from_secs(5), || async {
        call(&keys[1], false, det)
            .await
            .is_ok_and(|r| r.status() == 403)
    })
    .await;
    assert!(barred.is_ok(), "a hit for a model the tenant may not call");
    // The roll-up records t1's two hits as free requests: tokens only for the first call.
    let t1 = || async {
        let mut admin = n.admin_client().await.ok()?;
        let state = admin
            .cluster_state(pb::ClusterStateRequest {
                section: "usage".into(),
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner();
        let v: Value = serde_json::from_str(&state.json).ok()?;
        // A tenant's day is a list of [key, totals] rows: the model's summed over providers
        // (the hits have none).
        let rows = v.as_object()?.values().find_map(|day| day.get("t1"))?;
        let mut sum = serde_json::Map::new();
        for row in rows.as_array()? {
            if row[0]["model"] != "mock" {
                continue;
            }
            for (field, n) in row[1].as_object()? {
                let total = sum.get(field).and_then(Value::as_u64).unwrap_or(0);
                sum.insert(field.clone(), (total + n.as_u64()?).into());
            }
        }
        (!sum.is_empty()).then_some(Value::Object(sum))
    };
    wait_until("t1's roll-up", Duration::from_secs(5), || async {
        t1().await.is_some_and(|u| u["cache_hits"] == 2)
    })
    .await
    .expect("hits recorded");
    let u = t1().await.expect("roll-up");
    assert_eq!(u["requests"], 3, "{u}");
    assert_eq!(u["cost_micro_usd"], 0, "{u}");
    let first_call_tokens = first_body["usage"]["total_tokens"].as_u64().expect("usage");
    assert_eq!(
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap(),
        first_call_tokens,
        "hits add no tokens: {u}"
    );
}

/// The mock refuses what OpenAI refuses (a missing or wrong key, unknown fields, values out of
/// range, `stream_options` without `stream`): a request the gateway turns away nothing of still
/// reaches it whole, with the provider's key.
#[tokio::test]
async fn the_openai_adapter_sends_the_providers_key_and_only_fields_openai_knows() {
    let upstream = openai_mock_with_key("sk-provider-key").await;
    let toml = provider_toml(
        "mock",
        &upstream.base_url(),
        &["gpt-4o-mini"],
        "api_key_env = \"MOCK_OPENAI_KEY\"",
    );
    let node_holding =
        |key: &str| TestNode::start_with_env(&toml, vec![("MOCK_OPENAI_KEY".into(), key.into())]);
    let with_key = node_holding("sk-provider-key").await.expect("node starts");
    let answer = post(&with_key, chat_body("gpt-4o-mini", false, "")).await;
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    // `n` and `user` are OpenAI's own fields: passed, and `n` choices come back.
    let mut body: Value = serde_json::from_str(&chat_body("gpt-4o-mini", false, "")).unwrap();
    body["n"] = 2.into();
    body["user"] = "u-1".into();
    let answer = post(&with_key, body.to_string()).await;
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["choices"].as_array().map(Vec::len), Some(2));

    // The same request through a node holding the wrong key: the upstream's 401 is not the
    // client's fault, and never shown as its own key being wrong.
    let wrong = node_holding("sk-stale").await.expect("node starts");
    let answer = post(&wrong, chat_body("gpt-4o-mini", false, "")).await;
    let status = answer.status().as_u16();
    let text = answer.text().await.unwrap();
    assert!(status >= 500, "{status}: {text}");
    assert_eq!(
        upstream.stats.completed.load(SeqCst),
        2,
        "the wrong key was refused upstream"
    );
}

/// The mock itself answers as OpenAI does: the checks above are only worth what these are.
#[tokio::test]
async fn the_openai_mock_refuses_what_openai_refuses() {
    let upstream = openai_mock_with_key("sk-k").await;
    let client = reqwest::Client::new();
    let send = |body: Value, key: Option<&str>| {
        let mut r = client
            .post(format!("{}/chat/completions", upstream.base_url()))
            .json(&body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        async move {
            let answer = r.send().await.unwrap();
            let status = answer.status().as_u16();
            (status, answer.json::<Value>().await.unwrap())
        }
    };
    let ok = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(send(ok.clone(), Some("sk-k")).await.0, 200);
    let (status, body) = send(ok.clone(), None).await;
    assert_eq!((status, body["error"]["code"].clone()), (401, Value::Null));
    let (status, body) = send(ok.clone(), Some("sk-other")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let with = |field: &str, value: Value| {
        let mut b = ok.clone();
        b[field] = value;
        b
    };
    for (body, param) in [
        (with("temperature", 2.5.into()), Some("temperature")),
        (with("top_p", (-0.1).into()), Some("top_p")),
        (with("n", 0.into()), Some("n")),
        (
            with("stream_options", serde_json::json!({"include_usage": true})),
            Some("stream_options"),
        ),
        (
            with(
                "messages",
                serde_json::json!([{"role": "robot", "content": "hi"}]),
            ),
            Some("messages[0].role"),
        ),
        (with("ignore_eos", true.into()), None),
    ] {
        let (status, answer) = send(body.clone(), Some("sk-k")).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error", "{answer}");
        assert_eq!(answer["error"]["param"].as_str(), param, "{answer}");
    }
}

/// A stream the client drops is charged what was generated before it went: in the usage
/// roll-up, more than nothing and less than the whole answer or the reserve.
#[tokio::test]
async fn a_stream_the_client_drops_is_charged_what_was_generated() {
    let model = "mock@tokens:200;itl_ms:20";
    let (m, n) = setup(Flavor::Vllm, &[model], "", "").await;
    // The development tenant has no limit: its usage is recorded all the same.
    let body = chat_body(model, true, r#""max_tokens":300"#);
    let resp = post(&n, body).await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut read = 0;
    while read < 5 {
        stream.next().await.expect("a chunk").expect("no error");
        read += 1;
    }
    drop(stream);
    m.wait_aborted(1, Duration::from_secs(1))
        .await
        .expect("aborted upstream");
    let completion = || async {
        let state = n.gateway.cluster_state()?;
        let tokens: u64 = state
            .usage
            .values()
            .flat_map(|tenants| tenants.values())
            .flat_map(|day| day.rows())
            .map(|(_, t)| t.completion_tokens)
            .sum();
        (tokens > 0).then_some(tokens)
    };
    wait_until("the roll-up", Duration::from_secs(5), || async {
        completion().await.is_some()
    })
    .await
    .expect("rolled up");
    let charged = completion().await.expect("charged");
    // What the upstream generated before the call was cut: the node may not have read the
    // last of it, and is never charged more.
    let generated = m.stats.aborted_tokens.load(SeqCst);
    println!(
        "a stream dropped after 5 chunks of 200: charged {charged} completion tokens, \
         {generated} generated"
    );
    assert!(
        generated < 200 && (1..=generated).contains(&charged),
        "charged {charged} completion tokens for a stream dropped after about five of 200 \
         (the upstream generated {generated}; reserved 300)"
    );
}

/// Engine-specific fields that change scheduling, templates, decoding or cost (vLLM `priority`,
/// `chat_template`, guided decoding; OpenAI `store`, `service_tier`, ...) reach a provider only
/// from a tenant granted them; anyone else gets a 403 naming the field.
#[tokio::test]
async fn engine_specific_fields_pass_only_for_tenants_granted_them() {
    let (m, n) = setup(Flavor::Vllm, &["mock"], "", "").await;
    n.put_tier(tier("open", pb::Limits::default()))
        .await
        .expect("tier");
    let granted = n
        .tenant_with_key(pb::Tenant {
            engine_fields: vec!["priority".into()],
            ..tenant("batch", "open")
        })
        .await
        .expect("tenant and key");
    let dev = n.api_key.clone().expect("dev key");
    let client = reqwest::Client::new();
    let call = |key: &str, extra: &'static str| {
        chat_as(&client, &n.url(""), key, chat_body("mock", false, extra)).send()
    };
    let refused = call(&dev, r#""priority":-10"#).await.expect("sent");
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "field_not_allowed", "{body}");
    assert_eq!(body["error"]["param"], "priority", "{body}");
    let before = m.stats.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        call(&granted, r#""priority":-10"#)
            .await
            .expect("sent")
            .status(),
        200
    );
    assert_eq!(
        m.stats.requests.load(std::sync::atomic::Ordering::SeqCst),
        before + 1,
        "only the granted tenant's request reached the provider"
    );
    // Granted one field, not the others.
    let other = call(&granted, r#""chat_template":"{{ messages }}""#)
        .await
        .expect("sent");
    assert_eq!(other.status(), 403);
    // Requests without them are not affected.
    assert_eq!(call(&dev, "").await.expect("sent").status(), 200);
}

/// The mock stops at a request's output cap as engines do (`finish_reason` `length`), whole or
/// streamed, and the node passes that on.
#[tokio::test]
async fn an_answer_stops_at_the_output_cap_as_an_engines_does() {
    let (_m, n) = setup(Flavor::Vllm, &["mock@tokens:8"], "", "").await;
    let v: Value = post(&n, chat_body("mock@tokens:8", false, r#""max_tokens":3"#))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    let body = post(&n, chat_body("mock@tokens:8", true, r#""max_tokens":3"#))
        .await
        .bytes()
        .await
        .unwrap();
    let events = sse_events(&body);
    let finish: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_slice::<Value>(&e.data).ok())
        .filter_map(|c| c["choices"][0].get("finish_reason").cloned())
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [Value::from("length")], "{events:?}");
}

/// vLLM's own fields (`top_k`, `min_p`, guided decoding, ...) reach only providers that speak
/// vLLM's dialect: a model served only by a provider of OpenAI's API refuses them with a 400
/// naming the field, and a model a vLLM server serves too sends such requests there alone.
#[tokio::test]
async fn vllms_own_fields_reach_only_providers_that_speak_vllm() {
    let api = MockUpstream::with_flavor(Flavor::OpenAi).await.unwrap();
    let engine = MockUpstream::with_flavor(Flavor::Vllm).await.unwrap();
    let toml = format!(
        "{}{}",
        provider_toml_kind("api", "openai", &api.base_url(), &["both", "api-only"], ""),
        provider_toml_kind("engine", "vllm", &engine.base_url(), &["both"], ""),
    );
    let n = TestNode::start(&toml).await.unwrap();
    let refused = post(&n, chat_body("api-only", false, r#""top_k":5"#)).await;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_parameter", "{body}");
    assert_eq!(body["error"]["param"], "top_k", "{body}");
    assert_eq!(api.stats.requests.load(SeqCst), 0, "nothing reached it");
    // OpenAI's own fields go to either.
    let ok = post(&n, chat_body("api-only", false, r#""seed":5"#)).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(api.stats.requests.load(SeqCst), 1);
    for _ in 0..8 {
        let resp = post(&n, chat_body("both", false, r#""min_p":0.1"#)).await;
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }
    assert_eq!(
        engine.stats.requests.load(SeqCst),
        8,
        "all went to the vLLM server"
    );
    assert_eq!(api.stats.requests.load(SeqCst), 1, "none to OpenAI's API");
}

/// A request without `max_tokens` from a tenant limited in tokens is reserved the default
/// output, and the engine is told that cap, so it cannot generate beyond what was charged; a
/// cap the client set is kept, and a tenant limited only in requests is not capped.
#[tokio::test]
async fn an_uncapped_request_under_token_limits_reaches_the_engine_capped() {
    let (m, n) = setup_with_provider_config(&["mock"], "default_max_tokens = 300").await;
    n.put_tier(tier("metered", limit::tokens_per_minute(1_000_000)))
        .await
        .expect("tier");
    n.put_tier(tier("counted", limit::requests_per_minute(1_000)))
        .await
        .expect("tier");
    let mut keys = Vec::new();
    for (id, tier) in [("metered", "metered"), ("counted", "counted")] {
        keys.push(
            n.tenant_with_key(meridian_tests::tenant(id, tier))
                .await
                .expect("tenant and key"),
        );
    }
    let client = reqwest::Client::new();
    for (key, extra) in [
        (&keys[0], ""),
        (&keys[0], r#""max_tokens":20"#),
        (&keys[1], ""),
    ] {
        let r = chat_as(&client, &n.url(""), key, chat_body("mock", false, extra))
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        m.output_caps(),
        [Some(300), Some(20), None],
        "the provider's default_max_tokens, the client's own cap, no cap for a tenant limited \
         in requests only"
    );
}

/// Sends `head` (a request's head, its blank line included) on a new connection, then `body` in
/// pieces of `piece` bytes every `every`; the whole answer as text (or what came before the
/// node closed). Writing stops quietly once the node has answered and closed.
async fn raw_request(
    node: &TestNode,
    head: &str,
    body: &[u8],
    piece: usize,
    every: Duration,
) -> String {
    let mut conn = tokio::net::TcpStream::connect(node.http)
        .await
        .expect("connect");
    conn.write_all(head.as_bytes()).await.expect("head");
    let (mut read, mut write) = conn.into_split();
    let body = body.to_vec();
    let writer = tokio::spawn(async move {
        for chunk in body.chunks(piece.max(1)) {
            if write.write_all(chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
        // Keep the connection open until the node has answered.
        std::future::pending::<()>().await;
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), read.read_to_end(&mut answer)).await;
    writer.abort();
    String::from_utf8_lossy(&answer).into_owned()
}

/// The body is read only after the headers authenticate: a caller with a bad key is refused at
/// once, without the node waiting for (or buffering) the body it announced.
#[tokio::test]
async fn a_request_with_bad_credentials_is_refused_before_its_body_is_read() {
    let (_m, n) = setup(Flavor::Vllm, &["m"], "", "").await;
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-not-a-key\r\n\
                Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n";
    let started = Instant::now();
    // The body never comes.
    let answer = raw_request(&n, head, b"", 1, Duration::from_secs(60)).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered in {:?}",
        started.elapsed()
    );
}

/// A body slower than the node allows is cut off with 408 and a clear error: past its timeout,
/// or (past the first seconds) under its least rate.
#[tokio::test]
async fn a_body_that_trickles_or_never_ends_is_cut_off_with_408() {
    let (_m, n) = setup_with_node_config(&["m"], "[http]\nbody_timeout = \"1s\"\n").await;
    let key = n.api_key.clone().expect("dev key");
    let body = chat_body("m", false, "");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let started = Instant::now();
    let answer = raw_request(&n, &head, body.as_bytes(), 4, Duration::from_millis(200)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"body_timeout\""), "{answer}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "cut off after {took:?}, its timeout being 1 s"
    );
    // The same body sent at once is served.
    let answer = raw_request(&n, &head, body.as_bytes(), body.len(), Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Connections beyond the cap for one client address are answered 503 (`too_many_connections`,
/// `Retry-After`) and closed, and counted; a place freed is taken again.
#[tokio::test]
async fn connections_over_the_per_client_cap_are_refused_and_counted() {
    let (_m, n) = setup_with_node_config(&["m"], "[http]\nmax_connections_per_client = 2\n").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            tokio::net::TcpStream::connect(n.http)
                .await
                .expect("connect"),
        );
    }
    let answer = raw_request(&n, "", b"", 1, Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    drop(held.pop());
    // The node notices the close and frees the place.
    let mut served = false;
    for _ in 0..50 {
        let head = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        if raw_request(&n, head, b"", 1, Duration::ZERO)
            .await
            .starts_with("HTTP/1.1 200")
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "a freed place is taken again");
    drop(held);
    let metrics = n
        .get("/metrics")
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let refused = metrics
        .lines()
        .find(|l| l.starts_with("meridian_http_connections_refused_total{limit=\"client\"}"))
        .unwrap_or_default();
    assert!(refused.ends_with(" 1"), "{refused:?} in\n{metrics}");
}
