//! A real engine behind a node: llama.cpp's own server with SmolLM2-135M (see
//! `meridian_tests::engine`), driven through Meridian with the official `openai` and `anthropic`
//! SDKs (chat, text completions, Responses, Messages). Asserts
//! structure, counts and timings — never the generated words.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use meridian_policy::clock::WallClock;
use meridian_proto::pb::admin as pb;
use meridian_tests::engine::{self, LlamaServer};
use meridian_tests::{TestNode, limit, provider_toml, python_json, wait_until};
use serde_json::{Value, json};

/// What the tenant may use in a day (far more than the test needs: settlement is read back
/// from what the limit has left).
const DAY: u64 = 1_000_000;

/// A counter of the engine's own Prometheus text (`llamacpp:NAME`).
async fn engine_counter(engine: &LlamaServer, name: &str) -> f64 {
    let text = reqwest::get(engine.url("/metrics"))
        .await
        .expect("engine metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("llamacpp:{name} "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("llamacpp:{name} not in the engine's metrics:\n{text}"))
}

/// Runs `f` (an install or an engine's start: seconds of waiting) off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("the blocking task")
}

/// A llama.cpp server started by `start` (off the runtime's threads) and a node in front of it
/// serving it as `model`, on `clock`.
async fn engine_behind_a_node(
    start: impl FnOnce() -> anyhow::Result<LlamaServer> + Send + 'static,
    model: &str,
    clock: WallClock,
) -> (LlamaServer, TestNode) {
    let engine = blocking(start).await.expect("llama.cpp's server starts");
    let toml = provider_toml("llama", &engine.base_url(), &[model], "");
    let node = TestNode::start_on(&toml, Vec::new(), clock)
        .await
        .expect("node");
    (engine, node)
}

fn usage_of(v: &Value) -> (u64, u64) {
    let u = &v["usage"];
    let (p, c) = (
        u["prompt_tokens"].as_u64().expect("prompt_tokens"),
        u["completion_tokens"].as_u64().expect("completion_tokens"),
    );
    assert_eq!(u["total_tokens"].as_u64(), Some(p + c), "{u}");
    assert!(p > 0, "{u}");
    (p, c)
}

#[tokio::test]
async fn the_official_sdk_through_a_node_to_llama_cpp_is_metered_and_settled_as_the_engine_counts()
{
    // A daily limit: not across midnight (the next day starts from nothing).
    let clock = meridian_tests::clock_inside_one_day(Duration::from_secs(180));
    let (engine, node) = engine_behind_a_node(|| LlamaServer::start(2), "smollm2", clock).await;
    let key = node
        .tenant_in_tier("eng", "metered", limit::tokens_per_day(DAY))
        .await
        .expect("tier, tenant and key");

    let python = blocking(engine::python).await.expect("the engine's python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/engine_check.py");
    let base_url = format!("http://{}/v1", node.http);
    let script = script.to_str().expect("a UTF-8 path");
    let v = python_json(&python, &[script, &base_url, "smollm2", &key])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("the SDK saw: {v}");

    // Whole and streamed chat and text completions: what a client parses, counted as the
    // engine counted it, within the caps asked for.
    let (mut prompt, mut completion) = (0, 0);
    for (call, cap) in [
        ("chat", 12),
        ("chat_stream", 12),
        ("text", 6),
        ("text_stream", 6),
        ("messages", 8),
        ("messages_stream", 8),
        ("responses", 8),
        ("responses_stream", 8),
    ] {
        let (p, c) = usage_of(&v[call]);
        assert!(
            (1..=cap).contains(&c),
            "{call}: {c} tokens for a cap of {cap}"
        );
        prompt += p;
        completion += c;
    }
    for call in ["chat", "chat_stream"] {
        let finish = v[call]["finish"].as_str().unwrap_or_default();
        assert!(matches!(finish, "stop" | "length"), "{call}: {finish}");
    }
    for call in ["messages", "messages_stream"] {
        let stop = v[call]["stop_reason"].as_str().unwrap_or_default();
        assert!(matches!(stop, "end_turn" | "max_tokens"), "{call}: {stop}");
    }
    assert_eq!(v["messages_stream"]["text_matches"], true, "{v}");
    for call in ["responses", "responses_stream"] {
        let status = v[call]["status"].as_str().unwrap_or_default();
        assert!(
            matches!(status, "completed" | "incomplete"),
            "{call}: {status}"
        );
    }
    assert!(
        v["chat_stream"]["chunks"].as_u64()
            > v["chat_stream"]["usage"]["completion_tokens"].as_u64(),
        "one chunk a token, plus the usage: {v}"
    );
    assert_eq!(
        engine_counter(&engine, "tokens_predicted_total").await,
        completion as f64,
        "the engine generated what the clients were told"
    );

    // The tenant's daily roll-up holds the same figures.
    let admin = node.admin_client().await.expect("admin");
    wait_until(
        "the roll-up has the eight calls",
        Duration::from_secs(10),
        || {
            let mut admin = admin.clone();
            async move {
                let report = admin
                    .usage_report(pb::UsageReportRequest {
                        days: 1,
                        tenant: "eng".into(),
                        ..pb::UsageReportRequest::default()
                    })
                    .await
                    .map(tonic::Response::into_inner);
                report.is_ok_and(|r| {
                    r.rows.iter().any(|row| {
                        row.requests == 8
                            && row.input_tokens == prompt
                            && row.output_tokens == completion
                    })
                })
            }
        },
    )
    .await
    .expect("roll-up");

    // Settlement: the limit was charged what the engine counted. A text completion of three
    // token ids capped at one token reserves exactly 4, so what the day has left at its
    // admission is the limit, less the eight calls as the engine counted them, less 4.
    let probe = node
        .client()
        .post(node.url("/v1/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "smollm2", "prompt": [1, 2, 3], "max_tokens": 1}))
        .send()
        .await
        .expect("probe");
    assert_eq!(probe.status(), 200);
    let left: u64 = probe.headers()["x-ratelimit-remaining-tokens-day"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        left,
        DAY - (prompt + completion) - 4,
        "settled at the engine's counts ({prompt} in, {completion} out)"
    );
    let probed: Value = probe.json().await.expect("json");
    assert_eq!(probed["usage"]["prompt_tokens"], 3, "{probed}");
}

#[tokio::test]
async fn a_client_that_disconnects_frees_the_engines_slot_within_a_second() {
    let (engine, node) =
        engine_behind_a_node(|| LlamaServer::start(2), "smollm2", WallClock::system()).await;
    let busy_slots = || async {
        let slots: Value = reqwest::get(engine.url("/slots"))
            .await
            .expect("slots")
            .json()
            .await
            .expect("json");
        slots
            .as_array()
            .expect("a list of slots")
            .iter()
            .filter(|s| s["is_processing"] == true)
            .count()
    };
    let resp = node
        .client()
        .post(node.url("/v1/chat/completions"))
        .json(
            &json!({"model": "smollm2", "stream": true, "max_tokens": 1500,
                      "messages": [{"role": "user", "content": "Tell me a very long story."}]}),
        )
        .send()
        .await
        .expect("stream opens");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut seen = 0;
    while seen < 3 {
        let piece = body.next().await.expect("a chunk").expect("bytes");
        seen += piece.windows(6).filter(|w| w == b"data: ").count();
    }
    assert_eq!(busy_slots().await, 1, "the engine is generating for us");
    let left_at = Instant::now();
    drop(body);
    wait_until(
        "the engine's slot is free",
        Duration::from_secs(1),
        || async { busy_slots().await == 0 },
    )
    .await
    .expect("the slot is freed within a second of the client leaving");
    eprintln!("slot freed {:?} after the client left", left_at.elapsed());
}

/// The VllmActor supervises the same real server process as it would `vllm serve`: the
/// `[[vllm]]` command is a stand-in (`tests/python/vllm_llama.py`) that takes vLLM's arguments
/// and runs llama.cpp's server on the port and under the name given. Launch, readiness, a
/// request, `kill -9` and the restart, then a drain with a stream in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vllm_supervisor_launches_restarts_and_drains_a_real_engine() {
    use meridian_actors::vllm::ReplicaState;
    use meridian_actors::vllm::process::group_members;

    let python = blocking(engine::python).await.expect("the engine's python");
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/vllm_llama.py");
    let held = meridian_tests::ReservedPort::new().expect("a port");
    let port = held.port();
    let command = format!("{} {}", python.display(), wrapper.display());
    let toml = format!(
        "[auth]\nenabled = false\n\n[[vllm]]\nid = \"smol\"\nmodel = \"SmolLM2-135M-Instruct\"\n\
         served_model_names = [\"smol\"]\ncommand = {command:?}\nport = {port}\nmax_num_seqs = 2\n\
         health_interval = \"100ms\"\nscrape_interval = \"200ms\"\nstartup_budget = \"90s\"\n\
         restart_backoff = \"500ms\"\ndrain_timeout = \"20s\"\nstop_grace = \"2s\"\n"
    );
    let mut node = TestNode::start(&toml).await.expect("node");
    let replica = |node: &TestNode| node.replica("smol-0").expect("the replica is listed");
    let launched = Instant::now();
    until(&node, "ready", Duration::from_secs(90), |r| {
        r.state == ReplicaState::Ready
    })
    .await;
    let ready_after = launched.elapsed();
    let chat = |stream: bool, max_tokens: u32| {
        node.client()
            .post(node.url("/v1/chat/completions"))
            .json(
                &json!({"model": "smol", "stream": stream, "max_tokens": max_tokens,
                          "messages": [{"role": "user", "content": "Tell me about rivers."}]}),
            )
            .send()
    };
    let first = chat(false, 8).await.expect("sent");
    assert_eq!(first.status(), 200);
    let answer: Value = first.json().await.expect("json");
    assert!(
        answer["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| (1..=8).contains(&n))
    );

    // kill -9: deregistered, relaunched after the backoff, ready again, serving again.
    let pid = replica(&node).pid.expect("a pid");
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    let down = until(&node, "down", Duration::from_secs(5), |r| {
        r.state != ReplicaState::Ready
    })
    .await;
    until(
        &node,
        "relaunched and ready",
        Duration::from_secs(60),
        |r| r.state == ReplicaState::Ready && r.pid.is_some_and(|p| p != pid),
    )
    .await;
    let back = killed.elapsed();
    assert!(
        group_members(pid).is_empty(),
        "nothing of the killed process is left"
    );
    assert_eq!(replica(&node).restarts, 1);
    assert_eq!(chat(false, 4).await.expect("sent").status(), 200);

    // A drain lets the stream in flight finish, then stops the process.
    let stream = chat(true, 48).await.expect("stream opens");
    assert_eq!(stream.status(), 200);
    let pid = replica(&node).pid.expect("a pid");
    let drained = Instant::now();
    node.vllm
        .control("smol-0", meridian_actors::vllm::actor::Control::Drain)
        .await
        .expect("drain");
    let body = stream.text().await.expect("the stream runs to its end");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    until(&node, "stopped", Duration::from_secs(30), |r| {
        r.state == ReplicaState::Stopped
    })
    .await;
    let stop_took = drained.elapsed();
    assert!(
        group_members(pid).is_empty(),
        "no process of the drained replica is left"
    );
    eprintln!(
        "real engine under the VllmActor: ready {ready_after:?} after launch; kill -9 → \
         deregistered in {down:?}, ready again {back:?} after the kill; drained with a stream in \
         flight, stopped {stop_took:?} after the drain began"
    );
    node.begin_shutdown()
        .await
        .expect("shutdown")
        .expect("drained");
}

/// Polls (every 20 ms) until replica `smol-0` of `node` meets `cond`; how long it took.
async fn until(
    node: &TestNode,
    what: &str,
    limit: Duration,
    cond: impl Fn(&meridian_actors::vllm::ReplicaStatus) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let r = node.replica("smol-0").expect("the replica is listed");
        if cond(&r) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "smol-0 never became {what}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Embeddings from the real engine through a node, asked by the official SDK (which asks for
/// base64 and decodes it) and over plain HTTP (floats): one vector per input, of the model's
/// width, counted as the engine counted them, and the same input a second time from the cache.
#[tokio::test]
async fn embeddings_from_a_real_engine_reach_the_official_sdk() {
    let (_engine, node) = engine_behind_a_node(
        LlamaServer::start_embeddings,
        "smollm2-embed",
        WallClock::system(),
    )
    .await;
    let python = blocking(engine::python).await.expect("the engine's python");
    let script = "import json, sys\n\
from openai import OpenAI\n\
client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)\n\
r = client.embeddings.create(model='smollm2-embed', input=['rivers run to the sea', 'lakes'])\n\
print(json.dumps({'lengths': [len(d.embedding) for d in r.data], 'usage': r.usage.model_dump()}))\n";
    let base_url = format!("http://{}/v1", node.http);
    let key = node.api_key.as_deref().expect("auth is on");
    let v = python_json(&python, &["-c", script, &base_url, key])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("the SDK saw: {v}");
    // SmolLM2-135M's hidden size.
    assert_eq!(v["lengths"], json!([576, 576]), "{v}");
    let sdk_tokens = v["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert!(sdk_tokens >= 2, "{v}");
    let floats = |input: &str| {
        node.client()
            .post(node.url("/v1/embeddings"))
            .json(&json!({"model": "smollm2-embed", "input": input, "encoding_format": "float"}))
            .send()
    };
    let first = floats("the same text").await.expect("sent");
    assert_eq!(first.headers()["x-meridian-cache"], "miss");
    let body: Value = first.json().await.expect("json");
    assert_eq!(
        body["data"][0]["embedding"].as_array().map(Vec::len),
        Some(576)
    );
    let again = floats("the same text").await.expect("sent");
    assert_eq!(again.headers()["x-meridian-cache"], "hit");
    assert_eq!(again.json::<Value>().await.expect("json"), body);
}
