//! The small tasks a replica's actor leaves the waiting to: the watcher of a process
//! (readiness, then liveness, load and progress) and the stopper (drain, SIGTERM, SIGKILL).
//! Each reports back to the actor with the incarnation it belongs to.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use ractor::ActorRef;
use tokio::time::Instant;

use super::messages::VllmMsg;
use super::metrics::EngineMetrics;
use super::{VllmGroup, probe, process};
use crate::registry::Registry;

/// What a drain waits for before SIGTERM: no call of this node in flight (`provider`) and none
/// running or waiting in the engine at `addr` (other nodes'), or `timeout`.
pub(super) struct Drain {
    pub(super) provider: Option<Arc<crate::provider::Provider>>,
    pub(super) addr: String,
    pub(super) timeout: Duration,
}

/// Stops the process group led by `pid`: first (when draining) waits until nothing is in
/// flight there (see [`Drain`]), then SIGTERM, then SIGKILL after `grace` if anything of the
/// group is left.
pub(super) async fn terminate(pid: u32, grace: Duration, wait: Option<Drain>) {
    if let Some(d) = wait {
        let deadline = Instant::now() + d.timeout;
        while Instant::now() < deadline {
            let ours = d.provider.as_ref().map_or(0, |p| p.in_flight());
            // Other nodes' calls count too: the engine's own count of running and waiting
            // requests (an engine that does not answer has nothing left to finish).
            let engine = match probe::get(&d.addr, "/metrics", Duration::from_secs(1)).await {
                Ok(a) if a.status == 200 => {
                    let m = EngineMetrics::parse(&String::from_utf8_lossy(&a.body));
                    m.running + m.waiting
                }
                _ => 0.0,
            };
            if ours == 0 && engine <= 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if !process::signal_group(pid, Signal::SIGTERM) {
        return;
    }
    let deadline = Instant::now() + grace;
    while !process::group_members(pid).is_empty() {
        if Instant::now() >= deadline {
            tracing::warn!(
                pid,
                grace_ms = grace.as_millis() as u64,
                "replica ignored SIGTERM; SIGKILL"
            );
            process::signal_group(pid, Signal::SIGKILL);
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub(super) struct Watch {
    pub(super) addr: String,
    pub(super) group: Arc<VllmGroup>,
    pub(super) incarnation: u64,
    pub(super) me: ActorRef<VllmMsg>,
    pub(super) provider_id: String,
    pub(super) registry: Registry,
    pub(super) served: String,
}

/// Readiness, then liveness, load and progress of one process.
pub(super) async fn watch(w: Watch) {
    let g = &w.group;
    let probe_timeout = g
        .health_interval
        .clamp(Duration::from_millis(200), Duration::from_secs(5));
    let report = |msg: VllmMsg| {
        let _ = w.me.cast(msg);
    };
    let started = Instant::now();
    loop {
        tokio::time::sleep(g.health_interval).await;
        if started.elapsed() > g.startup_budget {
            report(VllmMsg::Unhealthy {
                incarnation: w.incarnation,
                reason: format!(
                    "not ready within its startup budget of {:?}",
                    g.startup_budget
                ),
            });
            return;
        }
        // A refused connection is normal while vLLM loads.
        let healthy = probe::get(&w.addr, "/health", probe_timeout)
            .await
            .is_ok_and(|a| a.status == 200);
        if healthy
            && let Ok(a) = probe::get_api(
                &w.addr,
                "/v1/models",
                w.group.api_key.as_ref().map(|k| k.expose()),
                probe_timeout,
            )
            .await
            && a.status == 200
            && lists_model(&a.body, &w.served)
        {
            report(VllmMsg::Ready {
                incarnation: w.incarnation,
                after: started.elapsed(),
            });
            break;
        }
    }
    let mut failures = 0;
    let mut last_failure = String::new();
    let mut last_scrape: Option<Instant> = None;
    // Generated tokens when progress was last seen, and when.
    let mut progress: Option<(f64, Instant)> = None;
    loop {
        tokio::time::sleep(g.health_interval).await;
        match probe::get(&w.addr, "/health", probe_timeout).await {
            Ok(a) if a.status == 200 => failures = 0,
            Ok(a) if a.status == 503 => {
                report(VllmMsg::Unhealthy {
                    incarnation: w.incarnation,
                    reason: "/health answered 503: its engine is dead".into(),
                });
                return;
            }
            Ok(a) => {
                failures += 1;
                last_failure = format!("answered {}", a.status);
            }
            Err(e) => {
                failures += 1;
                last_failure = e.to_string();
            }
        }
        if failures >= g.health_failures.max(1) {
            report(VllmMsg::Unhealthy {
                incarnation: w.incarnation,
                reason: format!("/health failed {failures} times in a row ({last_failure})"),
            });
            return;
        }
        if last_scrape.is_some_and(|t| t.elapsed() < g.scrape_interval) {
            continue;
        }
        last_scrape = Some(Instant::now());
        let Ok(a) = probe::get(&w.addr, "/metrics", probe_timeout).await else {
            continue;
        };
        if a.status != 200 {
            continue;
        }
        let m = EngineMetrics::parse(&String::from_utf8_lossy(&a.body));
        let provider = w.registry.provider_by_id(&w.provider_id);
        if let Some(p) = &provider {
            p.upstream_load()
                .set(m.running as u32, m.waiting as u32, m.kv_cache_usage);
        }
        let ours = provider.map_or(0, |p| p.in_flight());
        let busy = m.running > 0.0 || ours > 0;
        let now = Instant::now();
        match progress {
            Some((tokens, since)) if busy && m.generation_tokens <= tokens => {
                if now.duration_since(since) >= g.hang_timeout {
                    report(VllmMsg::Unhealthy {
                        incarnation: w.incarnation,
                        reason: format!(
                            "hung: {} requests running and no token generated for {:?}",
                            m.running.max(f64::from(ours)),
                            now.duration_since(since)
                        ),
                    });
                    return;
                }
            }
            _ => progress = Some((m.generation_tokens, now)),
        }
        report(VllmMsg::Scraped {
            incarnation: w.incarnation,
            metrics: m,
        });
    }
}

/// Whether a `/v1/models` body lists `model`.
fn lists_model(body: &[u8], model: &str) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("data")?.as_array().map(|d| {
                d.iter()
                    .any(|m| m.get("id").and_then(|i| i.as_str()) == Some(model))
            })
        })
        .unwrap_or(false)
}
