//! A rolling upgrade, as README's procedure does it: one node at a time, SIGTERM (the node turns
//! not ready and keeps serving for its `unready_period`, then drains: in-flight requests finish,
//! new ones are refused), start it again on the new binary (here the same one), wait until it has
//! caught up, go on to the next — followers first, the leader last. Three real processes under
//! steady chat traffic and steady Raft writes, behind a balancer that follows `/readyz` the way
//! Kubernetes' endpoints do and retries nothing: no request fails and no acknowledged write is
//! lost.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meridian_tests::procs::Harness;

const T: Duration = Duration::from_secs(30);

/// How long a stopping node stays out of rotation while still serving; the balancer looks at
/// readiness every [`PROBE_EVERY`], far more often.
const UNREADY: &str = "2s";
const PROBE_EVERY: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_request_and_loses_no_write() {
    let mut h = Harness::new(28);
    let ids = [1, 2, 3];
    for id in ids {
        h.extra
            .insert(id, format!("[shutdown]\nunready_period = \"{UNREADY}\"\n"));
    }
    let leader = h.boot(&ids).await;
    // A limit the traffic stays well inside of: each node admits from its static share and
    // needs no slice from the ledger, which a leader's stop would hold up until the next leader
    // is elected (a node past its share then refuses with 503 `quota_unavailable` after
    // `grant_wait`, as README says; the quota tests cover that).
    h.put_tier_with(leader, meridian_tests::limit::tokens_per_day(100_000_000))
        .await
        .expect("tier");
    h.put_tenant(leader, "rolling").await.expect("tenant");
    let key = h.api_key(leader, "rolling").await.expect("key");
    let urls: Vec<String> = ids.iter().map(|&id| h.node(id).http()).collect();
    h.wait_replicated(&ids, &[], T).await;

    // The balancer: each node's `/readyz`, probed every PROBE_EVERY; a node is sent requests
    // only while its last probe answered 200.
    let stop = Arc::new(AtomicBool::new(false));
    let ready: Arc<Vec<AtomicBool>> =
        Arc::new(urls.iter().map(|_| AtomicBool::new(true)).collect());
    let skipped = Arc::new(AtomicU64::new(0));
    let prober = {
        let (urls, ready, stop) = (urls.clone(), ready.clone(), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_millis(500))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                for (i, url) in urls.iter().enumerate() {
                    let ok = client
                        .get(format!("{url}/readyz"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200);
                    ready[i].store(ok, Ordering::Relaxed);
                }
                tokio::time::sleep(PROBE_EVERY).await;
            }
        })
    };
    // Clients behind it: anything that is not a whole 200 answer is a failed request.
    let ok = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for c in 0..4usize {
        let (urls, key, stop) = (urls.clone(), key.clone(), stop.clone());
        let (ok, failures) = (ok.clone(), failures.clone());
        let (ready, skipped) = (ready.clone(), skipped.clone());
        clients.push(tokio::spawn(async move {
            // A new connection per request, as a balancer spreading connections does.
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            let mut n = c;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let i = n % urls.len();
                if !ready[i].load(Ordering::Relaxed) {
                    skipped.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let url = &urls[i];
                let body = meridian_tests::chat_body("demo", n % 2 == 0, r#""max_tokens":6"#);
                let sent = client
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{:?} {url}: {e:?}", t0.elapsed())),
                    Ok(r) => {
                        let status = r.status();
                        match r.text().await {
                            Ok(text) if status == 200 && !text.contains("\"error\"") => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(text) => failures
                                .lock()
                                .unwrap()
                                .push(format!("{:?} {url}: {status} {text}", t0.elapsed())),
                            Err(e) => failures
                                .lock()
                                .unwrap()
                                .push(format!("{:?} {url}: body: {e}", t0.elapsed())),
                        }
                    }
                }
            }
        }));
    }
    let writes = h.steady_writes(&ids, "w");
    writes.wait_more(20, T).await;
    let started = Instant::now();

    // Followers first, the leader last.
    let mut order: Vec<u64> = ids.iter().copied().filter(|&id| id != leader).collect();
    order.push(leader);
    let mut timeline = Vec::new();
    for id in order {
        let served_before = ok.load(Ordering::Relaxed);
        let t = Instant::now();
        let status = h.stop(id).await;
        assert!(status.success(), "node {id} drained and exited 0: {status}");
        let stopped = t.elapsed();
        h.start(id).await;
        let others: Vec<u64> = ids.iter().copied().filter(|&o| o != id).collect();
        let leader_now = h.agreed_leader(&ids, None, T).await;
        writes.wait_more(10, T).await;
        let so_far = writes.acked_names();
        h.wait_replicated(&[id], &so_far, T).await;
        timeline.push(format!(
            "node {id}: out of rotation, drained and stopped in {stopped:?}, back and caught up after {:?} \
             (leader {leader_now}; {} requests served meanwhile, others {others:?})",
            t.elapsed(),
            ok.load(Ordering::Relaxed) - served_before
        ));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    prober.await.unwrap();
    let (acked, longest_gap) = writes.finish(started).await;
    h.wait_replicated(&ids, &acked, T).await;
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} requests failed during the rolling restart: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let served = ok.load(Ordering::Relaxed);
    assert!(served > 50, "only {served} requests");
    println!(
        "rolling restart of 3 nodes under load: {served} requests answered, none failed, none \
         retried (a node out of rotation was skipped {} times); {} acknowledged writes, none \
         lost; longest gap between acknowledged writes {longest_gap:?}\n{}",
        skipped.load(Ordering::Relaxed),
        acked.len(),
        timeline.join("\n")
    );
}
