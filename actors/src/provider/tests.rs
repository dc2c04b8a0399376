//! Supervision and slot accounting, driven through the Gateway with the in-process demo model.

use std::time::Duration;

use meridian_proto::openai::{ChatRequest, RequestLimits};
use meridian_proto::{ErrorKind, RequestId};

use super::*;
use futures::StreamExt;

use crate::connection::{ChatReply, RequestContext, StreamEnd};
use crate::gateway::{Gateway, GatewayConfig};
use crate::upstream::DemoModel;

fn spec(queue_capacity: u32, queue_timeout: Duration) -> ProviderSpec {
    ProviderSpec {
        prefix_affinity: false,
        weight: 1,
        price: Default::default(),
        id: "demo".into(),
        region: "local".into(),
        models: vec![ModelRoute {
            name: "demo".into(),
            upstream_name: "demo".into(),
        }],
        upstream: Upstream::Demo(DemoModel {
            word_delay: Duration::from_millis(5),
        }),
        max_concurrency: 1,
        queue_capacity,
        queue_timeout,
        timeouts: Timeouts::default(),
        tokenizer: Default::default(),
        default_max_tokens: 1024,
    }
}

/// A gateway whose demo provider has one slot and queues up to `queue_capacity` waiters for at
/// most `queue_timeout` each; and that provider.
async fn one_slot(queue_capacity: u32, queue_timeout: Duration) -> (Gateway, Arc<Provider>) {
    let config = GatewayConfig::standalone(vec![spec(queue_capacity, queue_timeout)]);
    let gw = Gateway::start(config).await.expect("gateway starts");
    let provider = gw.provider("demo").expect("provider");
    (gw, provider)
}

fn request(stream: bool) -> ChatRequest {
    let body = format!(
        r#"{{"model":"demo","stream":{stream},"messages":[{{"role":"user","content":"hello there"}}]}}"#
    );
    ChatRequest::from_json(body.as_bytes(), &RequestLimits::default()).expect("valid request")
}

fn ctx() -> RequestContext {
    RequestContext {
        trace: None,
        principal: None,
        reservation: None,
        request_id: RequestId::generate(),
        deadline: None,
        complexity: None,
        weight: 1,
    }
}

/// Runs a streaming request to the end; returns the number of chunks, or the error.
async fn run_stream(gw: Gateway) -> Result<usize, String> {
    let ChatReply::Stream(mut relay) = gw
        .chat(request(true), ctx())
        .await
        .answer
        .map_err(|e| e.message)?
    else {
        return Err("expected a stream".into());
    };
    let mut chunks = 0;
    while let Some(piece) = relay.next().await {
        chunks += piece.chunks.len();
        match piece.end {
            None => {}
            Some(StreamEnd::Done) => return Ok(chunks),
            Some(StreamEnd::Failed(e)) => return Err(e.message),
        }
    }
    Err("stream ended without a verdict".into())
}

/// Sends a plain request that must be refused (`why`); returns its error.
async fn refused(gw: &Gateway, why: &str) -> ApiError {
    gw.chat(request(false), ctx()).await.answer.expect_err(why)
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_crashed_provider_actor_is_restarted_and_loses_no_request() {
    let (gw, provider) = one_slot(16, Duration::from_secs(10)).await;
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(run_stream(gw.clone())))
        .collect();
    wait_until("three queued requests", || provider.queued() == 3).await;

    let actor = provider.actor.borrow().clone().expect("live actor");
    actor.cast(ProviderMsg::Crash).expect("cast");
    wait_until("a new incarnation", || provider.status().restarts == 1).await;

    let mut chunk_counts = Vec::new();
    for t in tasks {
        chunk_counts.push(t.await.expect("task").expect("request completes"));
    }
    // Role chunk + words + finish chunk; every request got the whole answer.
    assert!(
        chunk_counts.iter().all(|&n| n > 10 && n == chunk_counts[0]),
        "{chunk_counts:?}"
    );
    assert_eq!(provider.in_flight(), 0);
    assert_eq!(provider.queued(), 0);
    assert_eq!(provider.status().requests_total, 4);
    gw.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_full_queue_is_refused_with_retry_after() {
    let (gw, provider) = one_slot(1, Duration::from_secs(10)).await;
    let first = tokio::spawn(run_stream(gw.clone()));
    wait_until("one in flight", || provider.in_flight() == 1).await;
    let second = tokio::spawn(run_stream(gw.clone()));
    wait_until("one queued", || provider.queued() == 1).await;

    let err = refused(&gw, "queue is full").await;
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert_eq!(err.code.as_deref(), Some("queue_full"));
    assert!(err.retry_after.is_some());

    first.await.expect("task").expect("first completes");
    second.await.expect("task").expect("second completes");
}

#[tokio::test]
async fn a_request_that_cannot_start_before_its_queue_deadline_times_out() {
    let (gw, provider) = one_slot(8, Duration::from_millis(30)).await;
    let first = tokio::spawn(run_stream(gw.clone()));
    wait_until("one in flight", || provider.in_flight() == 1).await;

    let err = refused(&gw, "deadline passes").await;
    assert_eq!(err.kind, ErrorKind::Timeout);
    assert_eq!(err.code.as_deref(), Some("queue_timeout"));
    first.await.expect("task").expect("first completes");
    wait_until("the slot is back", || {
        provider.in_flight() == 0 && provider.queued() == 0
    })
    .await;
}

/// The order in which waiters of `plan` ((tenant, weight), queued in that order behind the
/// only slot, which `release_after` may inspect the queue before freeing) get their slots.
async fn service_order(
    queue_capacity: u32,
    plan: &[(&str, u32)],
    release_after: impl AsyncFnOnce(&Arc<Provider>, Instant),
) -> Vec<String> {
    let (gw, provider) = one_slot(queue_capacity, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let held = provider
        .acquire(deadline, None, 1)
        .await
        .expect("the only slot");
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, &(tenant, weight)) in plan.iter().enumerate() {
        let (p, order) = (Arc::clone(&provider), Arc::clone(&order));
        let t: Arc<str> = tenant.into();
        tasks.push(tokio::spawn(async move {
            let permit = p.acquire(deadline, Some(Arc::clone(&t)), weight).await;
            order.lock().expect("lock").push(t.to_string());
            drop(permit.expect("granted"));
        }));
        wait_until("the waiter to queue", || {
            provider.queued() as usize == i + 1
        })
        .await;
    }
    release_after(&provider, deadline).await;
    drop(held);
    for t in tasks {
        t.await.expect("task");
    }
    gw.stop(Duration::from_secs(1)).await;
    order.lock().expect("lock").clone()
}

#[tokio::test]
async fn waiters_are_served_round_robin_across_tenants_and_no_tenant_fills_the_queue() {
    let plan = [("a", 1), ("a", 1), ("a", 1), ("b", 1)];
    let order = service_order(6, &plan, async |provider, deadline| {
        // Tenant a already holds half the queue (3 of 6): a fourth is refused, b is not.
        let refused = provider
            .acquire(deadline, Some("a".into()), 1)
            .await
            .expect_err("a's share is full");
        assert_eq!(refused.code.as_deref(), Some("tenant_queue_full"));
    })
    .await;
    // b queued last but is served second: turns alternate between tenants.
    assert_eq!(order, ["a", "b", "a", "a"]);
}

#[tokio::test]
async fn a_heavier_tenant_gets_that_many_slots_per_turn() {
    // a (weight 3) queues four requests, then b (weight 1) two.
    let plan = [("a", 3), ("a", 3), ("a", 3), ("a", 3), ("b", 1), ("b", 1)];
    let order = service_order(12, &plan, async |_, _| {}).await;
    assert_eq!(
        order,
        ["a", "a", "a", "b", "a", "b"],
        "three of a's per turn, one of b's"
    );
}
