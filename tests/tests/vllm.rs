//! vLLM supervision end to end: a node launches the mock vLLM (`mock-vllm`, a separate process
//! that behaves like `vllm serve`) from a `[[vllm]]` section and routes to it once it is ready.
//! Each test prints the timeline it measured.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::{Duration, Instant};

use meridian_actors::vllm::actor::Control;
use meridian_actors::vllm::process::group_members;
use meridian_actors::vllm::{ReplicaState, ReplicaStatus};
use meridian_tests::procs::meridian_bin;
use meridian_tests::serve::serve;
use meridian_tests::{ReservedPort, TestNode, mock_vllm_stats};

/// A node supervising one `[[vllm]]` group of the mock (see [`vllm_toml`]), with the loopback
/// ports its replicas may take held for as long as it lives.
struct Supervisor {
    node: TestNode,
    /// The first replica's port.
    port: u16,
    _ports: Vec<ReservedPort>,
}

impl std::ops::Deref for Supervisor {
    type Target = TestNode;

    fn deref(&self) -> &TestNode {
        &self.node
    }
}

/// A [`Supervisor`] of the one-replica group [`vllm_toml`] makes of `fields` and `env` (a group
/// of more replicas: [`supervise`] on as many ports).
async fn node(fields: &str, env: &[(&str, &str)]) -> Supervisor {
    supervise(1, |port| vllm_toml(port, fields, env)).await
}

/// A [`Supervisor`] running the configuration `toml` makes for the first of `replicas`
/// consecutive ports.
async fn supervise(replicas: u16, toml: impl FnOnce(u16) -> String) -> Supervisor {
    let ports = ReservedPort::consecutive(replicas).unwrap();
    let port = ports[0].port();
    let node = TestNode::start(&toml(port)).await.unwrap();
    Supervisor {
        node,
        port,
        _ports: ports,
    }
}

/// A node's configuration: one `[[vllm]]` group of the mock from `port` on, with `fields`
/// (`key = value` lines) set in the section over the defaults below, and `env` given to the mock.
fn vllm_toml(port: u16, fields: &str, env: &[(&str, &str)]) -> String {
    let mut section: Vec<(String, String)> = [
        ("id", "\"llama\""),
        ("model", "\"meta-llama/Llama-3.1-8B-Instruct\""),
        ("served_model_names", "[\"llama-8b\"]"),
        ("health_interval", "\"100ms\""),
        ("scrape_interval", "\"100ms\""),
        ("startup_budget", "\"10s\""),
        ("restart_backoff", "\"500ms\""),
        ("restart_backoff_max", "\"4s\""),
        ("drain_timeout", "\"5s\""),
        ("stop_grace", "\"1s\""),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    section.push((
        "command".into(),
        format!("{:?}", env!("CARGO_BIN_EXE_mock-vllm")),
    ));
    section.push(("port".into(), port.to_string()));
    for line in fields.lines().filter(|l| !l.trim().is_empty()) {
        let (k, v) = line.split_once('=').unwrap();
        let k = k.trim().to_owned();
        section.retain(|(key, _)| *key != k);
        section.push((k, v.trim().to_owned()));
    }
    let section: String = section
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
    let env: String = env
        .iter()
        .map(|(k, v)| format!("{k} = \"{v}\"\n"))
        .collect();
    format!("[auth]\nenabled = false\n\n[[vllm]]\n{section}\n[vllm.env]\n{env}")
}

fn replica(node: &TestNode, name: &str) -> ReplicaStatus {
    node.replica(name)
        .unwrap_or_else(|| panic!("no replica {name}"))
}

/// Polls (every 5 ms) until `cond` holds for replica `name`; returns it and how long it took.
async fn until(
    node: &TestNode,
    name: &str,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&ReplicaStatus) -> bool,
) -> (ReplicaStatus, Duration) {
    let started = Instant::now();
    loop {
        let r = replica(node, name);
        if cond(&r) {
            return (r, started.elapsed());
        }
        assert!(
            started.elapsed() < timeout,
            "{name} never became {what} within {timeout:?}; it is {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `meridian admin … ARGS` against `node`, as an operator runs it: what it printed, or what
/// it printed on its standard error if it failed.
fn admin_cli(node: &TestNode, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(meridian_bin())
        .args(["admin", "--addr", &format!("http://{}", node.admin)])
        .args(["--token", &node.admin_token])
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `meridian admin … vllm ARGS` against `node` (see [`admin_cli`]).
fn vllm_cli(node: &TestNode, args: &[&str]) -> Result<String, String> {
    admin_cli(node, &[&["vllm"], args].concat())
}

/// A chat request for `llama-8b` to `url` by `client`, streamed or not, for the caller to send.
fn llama_chat(client: &reqwest::Client, url: &str, stream: bool) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header("content-type", "application/json")
        .body(meridian_tests::chat_body("llama-8b", stream, ""))
}

async fn chat(node: &TestNode, stream: bool) -> reqwest::Response {
    llama_chat(&node.client(), &node.url("/v1/chat/completions"), stream)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap()
}

/// Clients that send chat requests to a node one after another until stopped.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<(u32, Vec<String>)>>,
}

impl Load {
    /// `clients` clients of `node`, client `i` streaming if `stream(i)`; each starts sending as
    /// it is made.
    fn start(node: &TestNode, clients: usize, stream: fn(usize) -> bool) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = (0..clients)
            .map(|i| {
                let (client, url, stop) = (
                    node.client(),
                    node.url("/v1/chat/completions"),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0u32, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let r = llama_chat(&client, &url, stream(i)).send().await;
                        let (status, body) = match r {
                            Ok(r) => (r.status(), r.text().await.unwrap_or_else(|e| e.to_string())),
                            Err(e) => (reqwest::StatusCode::BAD_GATEWAY, e.to_string()),
                        };
                        if status == 200 && !body.contains("\"error\"") {
                            ok += 1;
                        } else {
                            failed.push(format!("{status}: {body}"));
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Self { stop, clients }
    }

    /// Tells the clients to stop after the request each is in.
    fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops the clients and waits for them; every request must have been answered in full (a
    /// 200 with no error in it) `during` what the test did. Returns how many were.
    async fn finish(self, during: &str) -> u32 {
        self.stop();
        let (mut ok, mut failed) = (0, Vec::new());
        for c in self.clients {
            let (o, f) = c.await.unwrap();
            ok += o;
            failed.extend(f);
        }
        assert!(
            failed.is_empty(),
            "{} requests failed {during}: {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
        ok
    }
}

/// What the mock vLLM on `port` has received.
async fn mock_requests(port: u16) -> u64 {
    mock_vllm_stats(port).await.unwrap()["requests"]
        .as_u64()
        .unwrap()
}

/// Waits (up to 10 s) until replica `name` is in `state`; returns it and how long it took.
async fn reaches(node: &TestNode, name: &str, state: ReplicaState) -> (ReplicaStatus, Duration) {
    until(node, name, state.as_str(), Duration::from_secs(10), |r| {
        r.state == state
    })
    .await
}

/// Waits (up to 10 s) until replica `name` is ready, and returns it.
async fn ready(node: &TestNode, name: &str) -> ReplicaStatus {
    reaches(node, name, ReplicaState::Ready).await.0
}

/// Asserts that no process of the group `leader` led is left, `when`.
fn assert_no_orphans(leader: u32, when: &str) {
    let left = group_members(leader);
    assert!(left.is_empty(), "orphans of {leader} {when}: {left:?}");
}

/// Shuts `node` down and waits until it has drained.
async fn shut_down(mut node: Supervisor) {
    node.node.begin_shutdown().await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_starting_replica_is_routed_only_once_ready() {
    let node = node("", &[("MOCK_VLLM_LOADING_MS", "1500")]).await;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loading = replica(&node, "llama-0");
    assert_eq!(loading.state, ReplicaState::Starting);
    assert!(
        loading.state_for >= Duration::from_millis(400),
        "the list shows how long it has been loading: {loading:?}"
    );
    // While it loads, the model is known but not routable: 503 with Retry-After.
    let (mut refused, mut raced) = (0, 0);
    while replica(&node, "llama-0").state != ReplicaState::Ready {
        let r = chat(&node, false).await;
        if r.status() == 200 {
            // It became ready between the look at the list and the request.
            assert_eq!(replica(&node, "llama-0").state, ReplicaState::Ready);
            raced = 1;
            break;
        }
        assert_eq!(r.status(), 503, "while loading");
        assert!(r.headers().contains_key("retry-after"));
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "no_ready_replica", "{body}");
        refused += 1;
        assert!(t0.elapsed() < Duration::from_secs(10), "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready_after = t0.elapsed();
    assert!(
        ready_after >= Duration::from_millis(1400),
        "ready before it loaded"
    );
    assert!(refused > 0);
    // Nothing reached the mock before it was ready; every request after does.
    assert_eq!(mock_requests(node.port).await, raced);
    for stream in [false, true, false] {
        let r = chat(&node, stream).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.contains("chat.completion"), "{text}");
    }
    assert_eq!(mock_requests(node.port).await, raced + 3);
    // The engine's own time to first token, re-exported as its histogram with its buckets
    // (the mock answers at once: every first token in vLLM's first bucket, 1 ms).
    let first_tokens = raced + 3;
    let labels = "replica=\"llama-0\",group=\"llama\"";
    let wanted = [
        format!(
            "meridian_vllm_replica_time_to_first_token_seconds_count{{{labels}}} {first_tokens}"
        ),
        format!(
            "meridian_vllm_replica_time_to_first_token_seconds_bucket{{le=\"0.001\",{labels}}} {first_tokens}"
        ),
        format!(
            "meridian_vllm_replica_time_to_first_token_seconds_bucket{{le=\"+Inf\",{labels}}} {first_tokens}"
        ),
        "# TYPE meridian_vllm_replica_time_to_first_token_seconds histogram".to_owned(),
    ];
    let scraped = Instant::now();
    loop {
        let metrics = node.metrics().await;
        if wanted.iter().all(|w| metrics.contains(w.as_str())) {
            break;
        }
        assert!(
            scraped.elapsed() < Duration::from_secs(3),
            "the engine TTFT histogram is not exported: {wanted:?} in\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let models = node.get_json("/v1/models").await.unwrap();
    assert_eq!(models["data"][0]["id"], "llama-8b");
    println!(
        "slow start: loading 1500 ms; shown as starting for {} ms at t+500 ms; ready and routed \
         after {} ms; {refused} requests meanwhile got 503 no_ready_replica, 0 reached the mock",
        loading.state_for.as_millis(),
        ready_after.as_millis()
    );
    shut_down(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_is_deregistered_at_once_and_restarted_with_backoff() {
    let node = node("", &[("MOCK_VLLM_CHILDREN", "2")]).await;
    let first = ready(&node, "llama-0").await;
    assert_eq!(chat(&node, false).await.status(), 200);
    let mut timeline = Vec::new();
    let mut pid = first.pid.unwrap();
    for (round, backoff) in [(1, 500u64), (2, 1000)] {
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        let killed = Instant::now();
        // Deregistered: out of the routing table.
        while node.gateway.provider_by_id("1/llama-0").is_some() {
            assert!(
                killed.elapsed() < Duration::from_secs(1),
                "still routed 1 s after the kill"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let deregistered = killed.elapsed();
        // From now on no request goes to the dead port: 503 until it is back.
        let r = chat(&node, false).await;
        assert_eq!(r.status(), 503);
        let (relaunched, _) = until(
            &node,
            "llama-0",
            "relaunched",
            Duration::from_secs(5),
            |r| r.pid.is_some_and(|p| p != pid),
        )
        .await;
        let relaunch = killed.elapsed();
        // The old group (the mock and its two children) is gone before the relaunch.
        assert_no_orphans(pid, "at the relaunch");
        let ready = ready(&node, "llama-0").await;
        let back = killed.elapsed();
        assert_eq!(ready.restarts, round);
        assert!(
            ready
                .last_exit
                .as_deref()
                .unwrap_or("")
                .contains("signal: 9"),
            "{ready:?}"
        );
        let expected = Duration::from_millis(backoff);
        assert!(
            relaunch >= expected.mul_f64(0.9)
                && relaunch <= expected.mul_f64(1.1) + Duration::from_millis(150),
            "round {round}: relaunched {relaunch:?} after the kill; the backoff is {expected:?}"
        );
        assert_eq!(chat(&node, true).await.status(), 200);
        timeline.push(format!(
            "kill #{round}: deregistered +{} ms, relaunched +{} ms (backoff {backoff} ms), ready +{} ms",
            deregistered.as_millis(),
            relaunch.as_millis(),
            back.as_millis()
        ));
        pid = relaunched.pid.unwrap();
    }
    println!("kill -9 after ready: {}", timeline.join("; "));
    shut_down(node).await;
    assert_no_orphans(pid, "after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_ends_in_failed() {
    let node = node(
        "restart_backoff = \"100ms\"\nmax_restarts = 2\nrestart_window = \"60s\"",
        &[("MOCK_VLLM_CRASH_AFTER_MS", "300")],
    )
    .await;
    let (failed, after) = reaches(&node, "llama-0", ReplicaState::Failed).await;
    assert_eq!(
        failed.restarts, 2,
        "two restarts, then the third crash is one too many"
    );
    assert!(failed.pid.is_none());
    // It stays down: no more launches.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = replica(&node, "llama-0");
    assert_eq!((still.state, still.restarts), (ReplicaState::Failed, 2));
    let metrics = node.metrics().await;
    assert!(
        metrics.contains("meridian_vllm_replica_failed{replica=\"llama-0\",group=\"llama\"} 1"),
        "the alert metric is set"
    );
    assert!(
        metrics.contains("meridian_vllm_crashes_total 3"),
        "{metrics}"
    );
    // An operator can start it again (it crashes again, but it was launched).
    let answer = node.vllm.control("llama-0", Control::Start).await.unwrap();
    assert!(answer.contains("starting"), "{answer}");
    println!(
        "crash loop (crash 300 ms after start, backoff 100 ms doubling, max 2 restarts): failed \
         after {} ms with {} restarts; last exit: {}",
        after.as_millis(),
        failed.restarts,
        failed.last_exit.unwrap_or_default()
    );
    shut_down(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_is_detected_and_restarted() {
    let node = node(
        "hang_timeout = \"1s\"",
        &[("MOCK_VLLM_HANG_AFTER_MS", "1000")],
    )
    .await;
    let ready = ready(&node, "llama-0").await;
    // Wait until the mock hangs (1 s after its start), then send a request that never
    // progresses while /health keeps answering 200.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sent = Instant::now();
    let answer = chat(&node, true).await;
    let answered = sent.elapsed();
    assert!(
        answer.status().is_server_error(),
        "the hung request fails once the replica is killed: {}",
        answer.status()
    );
    let (restarted, _) = until(
        &node,
        "llama-0",
        "restarted",
        Duration::from_secs(10),
        |r| r.restarts >= 1 && r.pid != ready.pid,
    )
    .await;
    let why = restarted.last_exit.clone().unwrap_or_default();
    assert!(why.contains("hung"), "{why}");
    assert!(
        answered < Duration::from_secs(3),
        "hang detected and the request ended within 3 × hang_timeout: {answered:?}"
    );
    println!(
        "hang (health 200, no tokens): the stuck request ended after {} ms (hang_timeout 1 s); \
         replica restarted: {why}",
        answered.as_millis()
    );
    shut_down(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_failing_its_health_checks_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unhealthy");
    let file_env = file.display().to_string();
    let node = node(
        "health_failures = 3",
        &[("MOCK_VLLM_UNHEALTHY_FILE", &file_env)],
    )
    .await;
    let ready = ready(&node, "llama-0").await;
    // `/health` answers `status` until the replica is taken out; the next process is healthy.
    // Returns how long it took to be taken out and why it was restarted.
    let fail_with = |status: &'static str, restarts: u64| {
        let (node, file) = (&node, &file);
        async move {
            std::fs::write(file, status).unwrap();
            let failing = Instant::now();
            until(node, "llama-0", "taken out", Duration::from_secs(3), |r| {
                r.state != ReplicaState::Ready
            })
            .await;
            let detected = failing.elapsed();
            std::fs::remove_file(file).unwrap();
            let (back, _) = until(
                node,
                "llama-0",
                "ready again",
                Duration::from_secs(10),
                |r| r.state == ReplicaState::Ready && r.restarts >= restarts,
            )
            .await;
            (detected, back.last_exit.unwrap_or_default(), back.pid)
        }
    };
    // 500s (the process is up): three failures in a row, 100 ms apart.
    let (detected, why, pid) = fail_with("500", 1).await;
    assert_ne!(pid, ready.pid, "a new process");
    assert!(why.contains("/health failed 3 times in a row"), "{why}");
    assert!(
        detected <= Duration::from_secs(1),
        "three failed checks 100 ms apart took {detected:?} to act on"
    );
    // A dead engine (503) is acted on at its first answer.
    let (dead_after, why, _) = fail_with("503", 2).await;
    assert!(why.contains("engine is dead"), "{why}");
    assert!(
        dead_after <= Duration::from_millis(300),
        "a 503 is acted on at its first answer (checks 100 ms apart): {dead_after:?}"
    );
    println!(
        "health failures: three 500s taken out after {} ms, a 503 after {} ms",
        detected.as_millis(),
        dead_after.as_millis()
    );
    shut_down(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_under_load_fails_no_request_and_leaves_no_orphans() {
    let node = supervise(2, |port| {
        vllm_toml(
            port,
            "min_replicas = 2\nmax_replicas = 2",
            &[
                ("MOCK_VLLM_SCRIPT", "tokens=10;itl_ms=30;ttft_ms=100"),
                ("MOCK_VLLM_CHILDREN", "2"),
                ("MOCK_VLLM_IGNORE_SIGTERM", "1"),
            ],
        )
    })
    .await;
    for name in ["llama-0", "llama-1"] {
        ready(&node, name).await;
    }
    let leader = replica(&node, "llama-0").pid.unwrap();
    let load = Load::start(&node, 6, |i| i % 2 == 0);
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Through the CLI, as an operator would.
    vllm_cli(&node, &["drain", "llama-0"]).expect("the drain");
    let drained_at = Instant::now();
    let (stopped, _) = reaches(&node, "llama-0", ReplicaState::Stopped).await;
    let stop_took = drained_at.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ok = load.finish("during the drain").await;
    assert!(ok > 20, "only {ok} requests");
    // It ignored SIGTERM, so it and its children were SIGKILLed after stop_grace; none left.
    assert_no_orphans(leader, "after the drain");
    assert!(
        stop_took >= Duration::from_secs(1),
        "SIGKILL only after the 1 s grace"
    );
    let list = vllm_cli(&node, &["list"]).expect("the list");
    assert!(
        list.contains("llama-0") && list.contains("stopped"),
        "{list}"
    );
    assert!(
        list.contains("llama-1") && list.contains("ready (up"),
        "{list}"
    );
    println!(
        "drain under load: {ok} requests ok, 0 failed; llama-0 stopped {} ms after the drain \
         (SIGTERM ignored, SIGKILL after 1 s), last exit: {}; no process of its group left\n{list}",
        stop_took.as_millis(),
        stopped.last_exit.unwrap_or_default()
    );
    let survivor = replica(&node, "llama-1").pid.unwrap();
    shut_down(node).await;
    assert_no_orphans(survivor, "after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_scales_up_under_load_and_back_down_when_idle() {
    let node = supervise(2, |port| {
        vllm_toml(
            port,
        "max_replicas = 2\nautoscale_target = 2\nautoscale_interval = \"300ms\"\nautoscale_cooldown = \"500ms\"",
        &[("MOCK_VLLM_SCRIPT", "tokens=20;itl_ms=25;ttft_ms=20")],
        )
    })
    .await;
    ready(&node, "llama-0").await;
    assert_eq!(node.vllm.list().len(), 1, "min_replicas = 1 to begin with");
    // Clients start sending as they are made (making one takes a while).
    let loaded = Instant::now();
    let load = Load::start(&node, 8, |_| true);
    let mut launched = None;
    // When the node first saw llama-0 over the target (2 in flight): the load the decision
    // is made on, once the clients are all sending.
    let mut overloaded: Option<Instant> = None;
    let up = loop {
        let list = node.vllm.list();
        if list.iter().any(|r| r.name == "llama-0" && r.in_flight > 2) {
            overloaded.get_or_insert_with(Instant::now);
        }
        let second = list.into_iter().find(|r| r.name == "llama-1");
        if let Some(r) = second {
            launched.get_or_insert(loaded.elapsed());
            if r.state == ReplicaState::Ready {
                break loaded.elapsed();
            }
        }
        // Decided within 3 autoscale intervals of the overload; then the mock's own start.
        assert!(
            launched.is_some()
                || overloaded.is_none_or(|t| t.elapsed() < Duration::from_millis(900)),
            "not scaled up within 3 × the 300 ms autoscale interval of the overload"
        );
        assert!(
            loaded.elapsed() < Duration::from_secs(5),
            "the second replica never became ready"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        overloaded.is_some(),
        "scaled up without the node ever showing llama-0 over its target"
    );
    // Both replicas take traffic: each one's process is sent requests.
    let (first, second) = (
        replica(&node, "llama-0").port,
        replica(&node, "llama-1").port,
    );
    let before = (mock_requests(first).await, mock_requests(second).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let serving: Vec<u32> = node.vllm.list().iter().map(|r| r.in_flight).collect();
    let sent = (
        mock_requests(first).await - before.0,
        mock_requests(second).await - before.1,
    );
    load.stop();
    assert!(
        sent.0 > 0 && sent.1 > 0,
        "in 500 ms of load the replicas were sent {sent:?} requests (in flight: {serving:?})"
    );
    load.finish("while scaling up").await;
    let idle = Instant::now();
    let started = Instant::now();
    while node.vllm.list().len() > 1 {
        assert!(
            started.elapsed() < Duration::from_millis(2_400),
            "not scaled down within 3 × (the 500 ms cool-down and a 300 ms interval): {:?}",
            node.vllm.list()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let down = idle.elapsed();
    assert_eq!(node.vllm.list()[0].name, "llama-0");
    let metrics = node.metrics().await;
    assert!(
        metrics.contains("meridian_vllm_scale_events_total{direction=\"up\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meridian_vllm_scale_events_total{direction=\"down\"} 1"),
        "{metrics}"
    );
    println!(
        "autoscale (target 2 in flight per replica, 8 streaming clients): llama-1 launched {} ms \
         and ready {} ms after the load began (in flight per replica then: {serving:?}); idle: \
         scaled back to 1 replica {} ms later (cool-down 500 ms)",
        launched.unwrap_or_default().as_millis(),
        up.as_millis(),
        down.as_millis()
    );
    shut_down(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_adapters_are_routed_and_loaded_at_run_time() {
    let node = node(
        "lora_modules = [\"sql=/adapters/sql\"]\nlora_runtime = true",
        &[],
    )
    .await;
    ready(&node, "llama-0").await;
    let chat_model = |model: &'static str| {
        let req = node.post_chat(meridian_tests::chat_body(model, false, ""));
        async move {
            let r = req.await.unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, body)
        }
    };
    // The startup adapter is a model of its own, answered by the replica under its name.
    let (status, body) = chat_model("sql").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "sql");
    assert_eq!(chat_model("finance").await.0, 404);
    // Loaded at run time through the CLI: routed from then on. An adapter that is not where
    // it is said to be is vLLM's 404, passed on.
    let cli = |args: &[&str]| vllm_cli(&node, args);
    let missing = cli(&["lora-load", "llama-0", "finance", "/no/such/adapter"])
        .expect_err("an adapter that is not there is refused");
    assert!(missing.contains("No adapter found"), "{missing}");
    let adapters = tempfile::tempdir().unwrap();
    let finance = adapters.path().join("finance");
    std::fs::create_dir(&finance).unwrap();
    let finance = finance.display().to_string();
    let provider = node.gateway.provider_by_id("1/llama-0").unwrap();
    let out = cli(&["lora-load", "llama-0", "finance", &finance]).expect("the adapter loaded");
    assert!(out.contains("added successfully"), "{out}");
    // The same provider (its queue and calls in flight carry on), now with the adapter.
    let after = node.gateway.provider_by_id("1/llama-0").unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&provider, &after),
        "the provider was replaced"
    );
    assert!(after.models().iter().any(|m| m.name == "finance"));
    let (status, body) = chat_model("finance").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        replica(&node, "llama-0")
            .models
            .contains(&"finance".to_owned())
    );
    // Loading it twice is vLLM's 400, passed on.
    let again = cli(&["lora-load", "llama-0", "finance", &finance])
        .expect_err("an adapter loaded twice is refused");
    assert!(again.contains("already been loaded"), "{again}");
    // Unloaded: no longer routed.
    cli(&["lora-unload", "llama-0", "finance"]).expect("the adapter unloaded");
    assert_eq!(chat_model("finance").await.0, 404);
    assert_eq!(chat_model("llama-8b").await.0, 200);
    println!(
        "LoRA: startup adapter `sql` routed; `finance` loaded, routed, refused twice, unloaded"
    );
    shut_down(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_over_its_budget_is_killed_and_counted_as_a_crash() {
    let node = node(
        "startup_budget = \"400ms\"\nrestart_backoff = \"100ms\"\nmax_restarts = 1",
        &[
            ("MOCK_VLLM_LOADING_MS", "5000"),
            ("MOCK_VLLM_CHILDREN", "1"),
        ],
    )
    .await;
    let (launched, _) = until(&node, "llama-0", "launched", Duration::from_secs(5), |r| {
        r.pid.is_some()
    })
    .await;
    let first = launched.pid.unwrap();
    let (failed, after) = reaches(&node, "llama-0", ReplicaState::Failed).await;
    let why = failed.last_exit.clone().unwrap_or_default();
    assert!(why.contains("startup budget"), "{why}");
    assert_eq!(failed.restarts, 1);
    assert_no_orphans(first, "after the start over its budget");
    println!(
        "startup budget 400 ms, loading 5 s: killed and restarted once, failed after {} ms ({why})",
        after.as_millis()
    );
    shut_down(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_up_only_takes_gpus_nvidia_smi_reports_free() {
    // A stand-in for nvidia-smi: two GPUs, the second busy with someone else's process.
    let dir = tempfile::tempdir().unwrap();
    let smi = dir.path().join("nvidia-smi");
    std::fs::write(
        &smi,
        "#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 81559, 4'\necho '1, NVIDIA H100 80GB HBM3, 81559, 70211'\n",
    )
    .unwrap();
    std::fs::set_permissions(&smi, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let toml_extra = "gpus = [0, 1]\ngpus_per_replica = 1\nmax_replicas = 2\nautoscale_target = 1\n\
         autoscale_interval = \"100ms\"\nautoscale_cooldown = \"300ms\"\n";
    let mock = env!("CARGO_BIN_EXE_mock-vllm");
    let n = supervise(2, |port| {
        format!(
            "[auth]\nenabled = false\n[gpus]\nnvidia_smi = {smi:?}\n\n[[vllm]]\nid = \"llama\"\n\
             model = \"m\"\nserved_model_names = [\"llama-8b\"]\ncommand = {mock:?}\n\
             port = {port}\nhealth_interval = \"100ms\"\nscrape_interval = \"100ms\"\n{toml_extra}\
             [vllm.env]\nMOCK_VLLM_SCRIPT = \"tokens=20;itl_ms=25\"\n",
        )
    })
    .await;
    let r = ready(&n, "llama-0").await;
    assert_eq!(r.gpus, [0], "CUDA_VISIBLE_DEVICES of the first replica");
    // What the process itself was given, not only what the supervisor says it gave.
    assert_eq!(
        mock_vllm_stats(n.port).await.unwrap()["cuda_visible_devices"],
        "0"
    );
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (client, url) = (n.client(), n.url("/v1/chat/completions"));
            tokio::spawn(async move {
                for _ in 0..6 {
                    let r = llama_chat(&client, &url, true).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    let _ = r.text().await;
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let metrics = n.metrics().await;
    assert_eq!(n.vllm.list().len(), 1, "GPU 1 is busy: no second replica");
    assert!(
        metrics.contains("meridian_vllm_scale_events_total{direction=\"up\"} 0"),
        "{metrics}"
    );
    let blocked = metrics
        .lines()
        .find(|l| l.starts_with("meridian_vllm_scale_events_total{direction=\"blocked\"}"))
        .unwrap()
        .to_owned();
    assert!(!blocked.ends_with(" 0"), "{blocked}");
    println!("autoscaling under load with GPU 1 busy (per nvidia-smi): no scale-up; {blocked}");
    shut_down(n).await;
}

/// A node killed with -9 cleans nothing up itself: its replica's whole process group still goes
/// (the guard leading it gets its parent-death signal and kills the group), the server's own
/// children included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_9_leaves_no_replica_process_behind() {
    let held = ReservedPort::consecutive(1).unwrap();
    let port = held[0].port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    let toml = format!(
        "[node]\nid = 1\ndata_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[grpc]\n\
         listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        dir.path().join("data"),
        vllm_toml(port, "", &[("MOCK_VLLM_CHILDREN", "2")])
    );
    std::fs::write(&config, toml).unwrap();
    let mut node = serve(&config, std::process::Stdio::null()).unwrap();
    // The mock answers its health check once it runs; its group is the replica's.
    let client = reqwest::Client::new();
    let started = Instant::now();
    while !client
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the replica never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let server = process_with_args(&["--port", &port.to_string()]).expect("the mock's process");
    let group = std::fs::read_to_string(format!("/proc/{server}/stat"))
        .ok()
        .and_then(|stat| {
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().nth(2)?.parse::<u32>().ok()
        })
        .expect("its process group");
    let members = group_members(group);
    // The mock and its two children (and the guard leading them).
    assert!(members.len() >= 3, "{members:?}");
    node.kill().unwrap();
    node.wait().unwrap();
    let killed = Instant::now();
    while !group_members(group).is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "left behind after the node's kill -9: {:?}",
            group_members(group)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "node killed with -9: its replica's {} processes gone within {:?}",
        members.len(),
        killed.elapsed()
    );
}

/// The pid of a live process whose arguments hold `args` in a row.
fn process_with_args(args: &[&str]) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                let words: Vec<String> = raw
                    .split(|b| *b == 0)
                    .map(|w| String::from_utf8_lossy(w).into_owned())
                    .collect();
                words.windows(args.len()).any(|w| w == args)
            })
        })
}

/// A replica is started with a key only the cluster's nodes hold (in its environment, not on
/// its command line): its API refuses anyone else, the node's calls carry it, and the admin API
/// never shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answers_only_the_node_that_holds_its_key() {
    let node = node("", &[]).await;
    let port = node.port;
    let replica = ready(&node, "llama-0").await;
    assert_eq!(chat(&node, false).await.status(), 200, "through the node");
    let direct = llama_chat(
        &reqwest::Client::new(),
        &format!("http://127.0.0.1:{port}/v1/chat/completions"),
        false,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(
        direct.status(),
        401,
        "straight to the replica, without its key"
    );
    let models = reqwest::get(format!("http://127.0.0.1:{port}/v1/models"))
        .await
        .unwrap();
    assert_eq!(models.status(), 401);
    // Not on its command line, where any local user could read it.
    let pid = replica.pid.unwrap();
    let cmdlines: Vec<String> = group_members(pid)
        .iter()
        .filter_map(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .collect();
    assert!(
        cmdlines.iter().all(|c| !c.contains("api-key")),
        "{cmdlines:?}"
    );
    let shown = admin_cli(&node, &["cluster", "state", "providers"]).expect("the providers");
    assert!(shown.contains("llama-0"), "{shown}");
    assert!(
        shown.contains("<redacted>") || !shown.contains("api_key"),
        "{shown}"
    );
    // The summary (no section) lists the providers too: redacted there as well.
    let summary = admin_cli(&node, &["cluster", "state"]).expect("the summary");
    assert!(summary.contains("llama-0"), "{summary}");
    assert!(summary.contains("<redacted>"), "{summary}");
    shut_down(node).await;
}
