//! The gRPC edge (meridian.v1.Inference, health, reflection) and the admin API end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use futures::StreamExt;
use meridian_proto::pb::admin::admin_client::AdminClient;
use meridian_proto::pb::admin::{ClusterStatusRequest, ListProvidersRequest, NodeStatusRequest};
use meridian_proto::pb::v1::inference_client::InferenceClient;
use meridian_proto::pb::v1::{ChatMessage, ChatRequest, FinishReason, ListModelsRequest, Role};
use meridian_tests::mock::{Flavor, MockUpstream};
use meridian_tests::{TestNode, limit, node_with_mock, tier};
use tonic::Code;
use tonic::transport::Channel;

async fn setup(models: &[&str], provider_extra: &str) -> (MockUpstream, TestNode) {
    node_with_mock(Flavor::OpenAi, models, provider_extra, "")
        .await
        .expect("mock and node start")
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

fn request(model: &str) -> ChatRequest {
    ChatRequest {
        model: model.into(),
        messages: vec![ChatMessage {
            role: Role::User as i32,
            content: "hello".into(),
            name: None,
            tool_call_id: None,
        }],
        max_tokens: Some(64),
        ..ChatRequest::default()
    }
}

#[tokio::test]
async fn chat_and_chat_stream_return_content_and_usage() {
    let (mock, node) = setup(&["mock"], "").await;
    let mut client = InferenceClient::with_interceptor(channel(node.grpc).await, node.key_bearer());

    let resp = client
        .chat(request("mock"))
        .await
        .expect("chat")
        .into_inner();
    let choice = &resp.choices[0];
    assert_eq!(
        choice.message.as_ref().expect("message").content,
        "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    );
    assert_eq!(choice.finish_reason, FinishReason::Stop as i32);
    assert_eq!(resp.usage.expect("usage").completion_tokens, 8);

    let mut stream = client
        .chat_stream(request("mock"))
        .await
        .expect("stream")
        .into_inner();
    let mut text = String::new();
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("no error");
        for c in &chunk.choices {
            text.push_str(&c.delta.as_ref().expect("delta").content);
        }
        if chunk.usage.is_some() {
            usage = chunk.usage;
        }
    }
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 ");
    assert_eq!(usage.expect("final usage").completion_tokens, 8);
    assert_eq!(mock.stats.completed.load(SeqCst), 2);

    let models = client
        .list_models(ListModelsRequest {})
        .await
        .expect("models")
        .into_inner();
    assert_eq!(models.models[0].id, "mock");
}

#[tokio::test]
async fn errors_map_to_grpc_codes() {
    let models = [
        "mock",
        "mock@fail:503",
        "mock@ttft_ms:3000",
        "mock@fail_after:2;itl_ms:10",
    ];
    let (_mock, node) = setup(&models, "first_byte_timeout = \"200ms\"").await;
    let mut client = InferenceClient::with_interceptor(channel(node.grpc).await, node.key_bearer());

    let mut empty = request("mock");
    empty.messages.clear();
    let err = client.chat(empty).await.expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.metadata().get("x-meridian-error-param").expect("param"),
        "messages"
    );

    let mut bad_role = request("mock");
    bad_role.messages[0].role = Role::Unspecified as i32;
    let err = client.chat(bad_role).await.expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut hot = request("mock");
    hot.temperature = Some(7.0);
    assert_eq!(
        client.chat(hot).await.expect_err("invalid").code(),
        Code::InvalidArgument
    );

    let err = client
        .chat(request("nope"))
        .await
        .expect_err("unknown model");
    assert_eq!(err.code(), Code::NotFound);

    let err = client
        .chat(request("mock@fail:503"))
        .await
        .expect_err("overloaded");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.metadata().get("retry-after").is_some());

    let err = client
        .chat_stream(request("mock@ttft_ms:3000"))
        .await
        .expect_err("timeout");
    assert_eq!(err.code(), Code::DeadlineExceeded);

    let mut stream = client
        .chat_stream(request("mock@fail_after:2;itl_ms:10"))
        .await
        .expect("stream starts")
        .into_inner();
    let mut chunks = 0;
    let mut last_err = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(_) => chunks += 1,
            Err(e) => last_err = Some(e),
        }
    }
    assert_eq!(chunks, 3, "role chunk + two tokens");
    assert_eq!(
        last_err
            .expect("the stream ends with an error status")
            .code(),
        Code::Unavailable
    );
}

#[tokio::test]
async fn health_reflection_and_admin_answer() {
    let (_mock, node) = setup(&["mock"], "").await;
    let ch = channel(node.grpc).await;

    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for service in ["", "meridian.v1.Inference"] {
        let resp = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(
            resp.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .expect("reflection")
        .into_inner();
    let Some(Ok(resp)) = responses.next().await else {
        panic!("a reflection answer");
    };
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"meridian.v1.Inference"), "{names:?}");
    assert!(
        !names.contains(&"meridian.admin.v1.Admin"),
        "the admin API is not on this port"
    );

    let mut admin = AdminClient::with_interceptor(channel(node.admin).await, node.admin_bearer());
    let status = admin
        .node_status(NodeStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.node_id, 1);
    assert_eq!(status.http_addr, node.http.to_string());
    assert!(!status.draining);
    let providers = admin
        .list_providers(ListProvidersRequest {})
        .await
        .expect("providers")
        .into_inner();
    assert_eq!(providers.providers.len(), 1);
    assert_eq!(providers.providers[0].id, "mock");
    assert_eq!(providers.providers[0].kind, "openai");
    assert_eq!(providers.providers[0].models, ["mock"]);

    // The node runs its own Raft member and has recorded itself in the replicated member table.
    let cluster = admin
        .cluster_status(ClusterStatusRequest {})
        .await
        .expect("cluster")
        .into_inner();
    assert_eq!(cluster.leader, Some(1));
    assert_eq!(cluster.voters, [1]);
    assert!(cluster.applied_index.is_some_and(|i| i >= 2), "{cluster:?}");
    assert_eq!(cluster.members.len(), 1);
    assert_eq!(cluster.members[0].http_addr, node.http.to_string());

    // Without the admin token the admin API refuses; without an API key, so does inference.
    let err = AdminClient::new(channel(node.admin).await)
        .node_status(NodeStatusRequest {})
        .await
        .expect_err("no admin token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = AdminClient::with_interceptor(
        channel(node.admin).await,
        meridian_tests::Bearer::new(Some("not-the-token")),
    )
    .node_status(NodeStatusRequest {})
    .await
    .expect_err("wrong admin token");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("wrong"), "{err:?}");
    let err = InferenceClient::new(channel(node.grpc).await)
        .chat(request("mock"))
        .await
        .expect_err("no API key");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        err.metadata().get("x-meridian-error-code").expect("code"),
        "missing_api_key"
    );
}

#[tokio::test]
async fn limits_answer_resource_exhausted_with_the_limit_and_retry_after() {
    let clock = meridian_tests::clock_inside_one_minute(Duration::from_secs(10));
    let (_mock, node) = meridian_tests::node_with_mock_on(Flavor::OpenAi, &["mock"], "", "", clock)
        .await
        .expect("mock and node start");
    node.put_tier(tier("dev", limit::requests_per_minute(1)))
        .await
        .expect("the dev tier gets a limit");
    let mut client = InferenceClient::with_interceptor(channel(node.grpc).await, node.key_bearer());
    client.chat(request("mock")).await.expect("the first fits");
    let err = client
        .chat(request("mock"))
        .await
        .expect_err("one a minute");
    assert_eq!(err.code(), Code::ResourceExhausted);
    let md = err.metadata();
    assert_eq!(
        md.get("x-meridian-error-code").expect("code"),
        "requests_per_minute"
    );
    assert!(md.get("retry-after").is_some());
    assert_eq!(md.get("x-ratelimit-limit-requests").expect("limit"), "1");
}

#[tokio::test]
async fn deterministic_calls_are_answered_from_the_cache_unary_and_streamed() {
    let (mock, node) = setup(&["mock"], "").await;
    let mut client = InferenceClient::with_interceptor(channel(node.grpc).await, node.key_bearer());
    let deterministic = ChatRequest {
        temperature: Some(0.0),
        ..request("mock")
    };
    let served = || mock.stats.completed.load(SeqCst);

    let first = client.chat(deterministic.clone()).await.expect("chat");
    assert_eq!(first.metadata().get("x-meridian-cache").unwrap(), "miss");
    let first = first.into_inner();
    assert_eq!(served(), 1);
    let again = client.chat(deterministic.clone()).await.expect("chat");
    assert_eq!(again.metadata().get("x-meridian-cache").unwrap(), "hit");
    assert_eq!(again.into_inner(), first);
    assert_eq!(served(), 1, "a hit calls no provider");

    // Streamed: the cached answer replayed as chunks, usage last.
    let streamed = client
        .chat_stream(deterministic.clone())
        .await
        .expect("stream");
    assert_eq!(streamed.metadata().get("x-meridian-cache").unwrap(), "hit");
    let chunks: Vec<_> = streamed
        .into_inner()
        .map(|c| c.expect("chunk"))
        .collect()
        .await;
    let text: String = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.delta.as_ref().map(|d| d.content.clone()))
        .collect();
    assert_eq!(text, first.choices[0].message.as_ref().unwrap().content);
    assert_eq!(
        chunks
            .last()
            .and_then(|c| c.usage)
            .map(|u| u.completion_tokens),
        first.usage.map(|u| u.completion_tokens)
    );
    assert_eq!(served(), 1);

    // Not deterministic: not cached, no metadata.
    let random = client.chat(request("mock")).await.expect("chat");
    assert!(random.metadata().get("x-meridian-cache").is_none());
    assert_eq!(served(), 2);
}

#[tokio::test]
async fn a_cancelled_chat_stream_closes_the_upstream_call_and_grpc_timeout_bounds_a_call() {
    let slow_stream = "mock@tokens:200;itl_ms:20";
    let slow_answer = "mock@ttft_ms:3000";
    let (mock, node) = setup(&[slow_stream, slow_answer], "").await;
    let mut client = InferenceClient::with_interceptor(channel(node.grpc).await, node.key_bearer());
    // The client cancels a stream after its first chunk: the node closes the upstream call.
    let mut stream = client
        .chat_stream(request(slow_stream))
        .await
        .expect("stream")
        .into_inner();
    stream.next().await.expect("a chunk").expect("no error");
    drop(stream);
    let cancelled = std::time::Instant::now();
    mock.wait_aborted(1, Duration::from_secs(1))
        .await
        .expect("closed upstream");
    println!(
        "gRPC: a cancelled ChatStream closed its upstream call {} ms later",
        cancelled.elapsed().as_millis()
    );
    // `grpc-timeout` on a call made by hand (tonic's client would start its own timer from
    // it and cancel first): the node ends the call itself at the deadline. tonic's server
    // answers an expired `grpc-timeout` with CANCELLED ("Timeout expired"); the client's own
    // timer is what shows DEADLINE_EXCEEDED to a gRPC client.
    let mut frame = vec![0u8];
    let message = prost::Message::encode_to_vec(&request(slow_answer));
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    let http2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let asked = std::time::Instant::now();
    let answer = http2
        .post(format!("http://{}/meridian.v1.Inference/Chat", node.grpc))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .bearer_auth(node.api_key.as_deref().expect("a key"))
        .body(frame)
        .send()
        .await
        .expect("answered");
    let ended = asked.elapsed();
    let status = answer
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert!(
        matches!(status.as_deref(), Some("1" | "4")),
        "CANCELLED or DEADLINE_EXCEEDED: {:?}",
        answer.headers()
    );
    assert!(
        ended < Duration::from_secs(1),
        "a 300 ms deadline ended the call after {ended:?}"
    );
}

#[tokio::test]
async fn embed_returns_one_vector_per_input_is_cached_and_refuses_empty_input() {
    use meridian_proto::pb::v1::EmbedRequest;
    let (mock, node) = setup(&["mock"], "").await;
    let mut client = InferenceClient::with_interceptor(channel(node.grpc).await, node.key_bearer());
    let ask = || EmbedRequest {
        model: "mock".into(),
        input: vec!["first text".into(), "second".into()],
        dimensions: Some(4),
        feature: Some("search".into()),
        ..EmbedRequest::default()
    };
    let resp = client.embed(ask()).await.expect("embed");
    assert_eq!(
        resp.metadata()
            .get("x-meridian-cache")
            .map(|v| v.to_str().unwrap()),
        Some("miss")
    );
    let body = resp.into_inner();
    assert_eq!(body.data.len(), 2);
    assert_eq!(body.data[1].index, 1);
    assert!(body.data.iter().all(|e| e.embedding.len() == 4));
    assert_eq!(body.usage.expect("usage").prompt_tokens, 3);
    let served = mock.stats.completed.load(SeqCst);
    let again = client.embed(ask()).await.expect("embed");
    assert_eq!(
        again
            .metadata()
            .get("x-meridian-cache")
            .map(|v| v.to_str().unwrap()),
        Some("hit")
    );
    assert_eq!(again.into_inner().data, body.data);
    assert_eq!(mock.stats.completed.load(SeqCst), served, "from the cache");
    // The message's feature is the call's feature (its tokens are counted under it).
    let metrics = node.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("meridian_tokens_total") && l.contains("feature=\"search\"")),
        "{metrics}"
    );
    let empty = client
        .embed(EmbedRequest {
            model: "mock".into(),
            ..EmbedRequest::default()
        })
        .await
        .expect_err("no input");
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("input"), "{}", empty.message());
    let bad_feature = client
        .embed(EmbedRequest {
            feature: Some("has space".into()),
            ..ask()
        })
        .await
        .expect_err("a bad feature");
    assert_eq!(bad_feature.code(), Code::InvalidArgument);
}

/// Callers with JWTs from a JWKS file, end to end: RS256 and EdDSA tokens are let in over HTTP
/// and gRPC alike; a token without `iss` or `aud`, signed by a key the file does not hold, or
/// naming no tenant is refused (401, its code saying why) on both.
#[tokio::test]
async fn jwts_from_a_jwks_file_rs256_and_eddsa_are_checked_over_http_and_grpc() {
    use base64::Engine as _;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, jwk};
    let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa key");
    let rsa_signing = EncodingKey::from_rsa_pem(rsa.serialize_pem().as_bytes()).expect("pem");
    let mut rsa_jwk = jwk::Jwk::from_encoding_key(&rsa_signing, Algorithm::RS256).expect("jwk");
    rsa_jwk.common.key_id = Some("rsa-1".into());
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key");
    let ed_signing = EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).expect("pem");
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ed.public_key_raw());
    let mut jwks = serde_json::to_value(jwk::JwkSet {
        keys: vec![rsa_jwk],
    })
    .expect("jwks");
    jwks["keys"].as_array_mut().expect("keys").push(
        serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "ed-1", "alg": "EdDSA"}),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks.to_string()).expect("jwks written");

    let mock = MockUpstream::with_flavor(Flavor::OpenAi)
        .await
        .expect("mock");
    let toml = format!(
        "[jwt]\nissuer = \"https://idp.example\"\naudience = \"meridian\"\njwks_file = {:?}\ntier_claim = \"tier\"\n{}",
        file.display().to_string(),
        meridian_tests::provider_toml("mock", &mock.base_url(), &["mock"], "")
    );
    let node = TestNode::start(&toml).await.expect("node");
    node.put_tier(tier("open", meridian_proto::pb::admin::Limits::default()))
        .await
        .expect("tier");
    let now = meridian_tests::unix_secs();
    let claims = serde_json::json!({"iss": "https://idp.example", "aud": "meridian",
        "exp": now + 300, "sub": "user-1", "tenant": "partner-co", "tier": "open"});
    let sign = |alg: Algorithm, kid: &str, key: &EncodingKey, claims: &serde_json::Value| {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        encode(&header, claims, key).expect("signed")
    };
    let without = |field: &str| {
        let mut c = claims.clone();
        c.as_object_mut().expect("object").remove(field);
        c
    };
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa key");
    let forged_key = EncodingKey::from_rsa_pem(other.serialize_pem().as_bytes()).expect("pem");
    let good = [
        sign(Algorithm::RS256, "rsa-1", &rsa_signing, &claims),
        sign(Algorithm::EdDSA, "ed-1", &ed_signing, &claims),
    ];
    let bad = [
        (
            sign(Algorithm::RS256, "rsa-1", &rsa_signing, &without("iss")),
            "missing_claim",
        ),
        (
            sign(Algorithm::EdDSA, "ed-1", &ed_signing, &without("aud")),
            "missing_claim",
        ),
        (
            sign(Algorithm::RS256, "rsa-1", &forged_key, &claims),
            "invalid_signature",
        ),
        (
            sign(Algorithm::EdDSA, "ed-1", &ed_signing, &without("tenant")),
            "missing_claim",
        ),
    ];

    let http = reqwest::Client::new();
    let body = meridian_tests::chat_body("mock", false, "");
    for token in &good {
        let resp = meridian_tests::chat_as(&http, &node.url(""), token, body.clone())
            .send()
            .await
            .expect("sent");
        assert_eq!(
            resp.status(),
            200,
            "{}",
            resp.text().await.unwrap_or_default()
        );
        let mut grpc = InferenceClient::with_interceptor(
            channel(node.grpc).await,
            meridian_tests::Bearer::new(Some(token)),
        );
        grpc.chat(request("mock")).await.expect("let in over gRPC");
    }
    for (token, code) in &bad {
        let resp = meridian_tests::chat_as(&http, &node.url(""), token, body.clone())
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), 401);
        let v: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(v["error"]["code"], *code, "{v}");
        let mut grpc = InferenceClient::with_interceptor(
            channel(node.grpc).await,
            meridian_tests::Bearer::new(Some(token)),
        );
        let err = grpc
            .chat(request("mock"))
            .await
            .expect_err("refused over gRPC");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert_eq!(
            err.metadata().get("x-meridian-error-code").expect("code"),
            *code
        );
    }
    assert_eq!(
        mock.stats.requests.load(SeqCst),
        4,
        "only the good tokens' calls reached the provider"
    );
}
