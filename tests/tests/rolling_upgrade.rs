//! A rolling upgrade, as README's procedure does it: one node at a time, SIGTERM (the node
//! drains: in-flight requests finish, new connections are refused), start it again on the new
//! binary (here the same one), wait until it has caught up, go on to the next — followers
//! first, the leader last. Three real processes under steady chat traffic and steady Raft
//! writes: no request fails and no acknowledged write is lost.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meridian_tests::procs::Harness;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_request_and_loses_no_write() {
    let mut h = Harness::new(28);
    let ids = [1, 2, 3];
    let leader = h.boot(&ids).await;
    h.put_tier(leader).await.expect("tier");
    h.put_tenant(leader, "rolling").await.expect("tenant");
    let key = h.api_key(leader, "rolling").await.expect("key");
    let urls: Vec<String> = ids.iter().map(|&id| h.node(id).http()).collect();
    h.wait_replicated(&ids, &[], T).await;

    // Clients behind a balancer that skips a draining node: a refused connection, or a 503
    // `node_draining` (a request that arrived as the drain began), is tried on the next node;
    // anything else that is not a whole 200 answer is a failed request.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, retried) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reset = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for c in 0..4usize {
        let (urls, key, stop) = (urls.clone(), key.clone(), stop.clone());
        let (ok, retried, failures) = (ok.clone(), retried.clone(), failures.clone());
        let reset = reset.clone();
        clients.push(tokio::spawn(async move {
            // A new connection per request, so that a node's drain shows as refused connects.
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            let mut n = c;
            while !stop.load(Ordering::Relaxed) {
                let body = meridian_tests::chat_body("demo", n % 2 == 0, r#""max_tokens":6"#);
                let mut tries = 0;
                loop {
                    let url = &urls[n % urls.len()];
                    n += 1;
                    let sent = client
                        .post(format!("{url}/v1/chat/completions"))
                        .bearer_auth(&key)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    match sent {
                        Err(e) if e.is_connect() && tries < urls.len() * 20 => {
                            tries += 1;
                            retried.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        // No answer at all on a new connection: one the kernel had queued for a
                        // node that closed its listener before taking it (the node never saw
                        // the request). A balancer retries such a reset; counted apart.
                        Err(e) if e.is_request() && !e.is_timeout() && tries < urls.len() * 20 => {
                            tries += 1;
                            reset.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(e) => {
                            failures.lock().unwrap().push(format!("{url}: {e}"));
                            break;
                        }
                        Ok(r) => {
                            let status = r.status();
                            match r.text().await {
                                Ok(text) if status == 200 && !text.contains("\"error\"") => {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                }
                                // Reached the node in the instant it began draining: a 503
                                // `node_draining` (nothing was sent to a provider), which the
                                // balancer retries on another node.
                                Ok(text)
                                    if status == 503
                                        && text.contains("node_draining")
                                        && tries < urls.len() * 20 =>
                                {
                                    tries += 1;
                                    retried.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                Ok(text) => failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("{url}: {status} {text}")),
                                Err(e) => {
                                    failures.lock().unwrap().push(format!("{url}: body: {e}"))
                                }
                            }
                            break;
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
            "node {id}: drained and stopped in {stopped:?}, back and caught up after {:?} \
             (leader {leader_now}; {} requests served meanwhile, others {others:?})",
            t.elapsed(),
            ok.load(Ordering::Relaxed) - served_before
        ));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
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
        "rolling restart of 3 nodes under load: {served} requests answered, none failed \
         ({} refused by a draining node and sent elsewhere, {} reset unanswered by a node \
         closing its listener and sent elsewhere); {} acknowledged \
         writes, none lost; longest gap between acknowledged writes {longest_gap:?}\n{}",
        retried.load(Ordering::Relaxed),
        reset.load(Ordering::Relaxed),
        acked.len(),
        timeline.join("\n")
    );
}
