//! Hostile input against a real node process: malformed and abusive requests across the HTTP
//! edge (bodies, JSON shapes, sizes, encodings, headers, broken HTTP, slow bodies, floods), the
//! gRPC edge and the admin API. Each must get a 4xx with an error that names the problem (a
//! closed connection for HTTP too broken to answer), never a 5xx, a panic or a hang; the node
//! answers a good request after all of them, and its resident memory growth is printed and
//! bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::{Duration, Instant};

use meridian_proto::pb::admin as pb;
use meridian_proto::pb::admin::admin_client::AdminClient;
use meridian_proto::pb::v1::inference_client::InferenceClient;
use meridian_proto::pb::v1::{ChatMessage, ChatRequest, EmbedRequest, Role};
use meridian_tests::Bearer;
use meridian_tests::limit;
use meridian_tests::procs::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// How long any one answer may take: beyond it, the node hangs.
const ANSWER: Duration = Duration::from_secs(5);

/// One HTTP case: what is sent, and what the answer must hold.
struct Case {
    name: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// The status expected.
    status: u16,
    /// Text the error body must hold (the field or code named).
    names: &'static str,
}

/// A JSON `body` sent to `/v1/chat/completions`.
fn json_case(name: &'static str, body: impl AsRef<[u8]>, status: u16, names: &'static str) -> Case {
    Case {
        name,
        path: "/v1/chat/completions",
        headers: vec![("content-type", "application/json".into())],
        body: body.as_ref().to_vec(),
        status,
        names,
    }
}

impl Case {
    /// The same request sent to `path` instead.
    fn at(mut self, path: &'static str) -> Self {
        self.path = path;
        self
    }

    /// The same request with the header `name: value` too.
    fn with_header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

fn chat_with(extra: &str) -> String {
    format!(r#"{{"model":"demo","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
}

fn http_cases() -> Vec<Case> {
    let mut deep = "[".repeat(100_000);
    deep.push_str(&"]".repeat(100_000));
    let many_messages = format!(
        r#"{{"model":"demo","messages":[{}]}}"#,
        vec![r#"{"role":"user","content":"x"}"#; 5_000].join(",")
    );
    vec![
        json_case("not JSON", "{not json", 400, "invalid_json"),
        json_case("a JSON array", "[1,2,3]", 400, "error"),
        json_case("a JSON string", r#""hello""#, 400, "error"),
        json_case("an empty body", "", 400, "error"),
        json_case(
            "no model",
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            400,
            "model",
        ),
        json_case(
            "model not a string",
            r#"{"model":7,"messages":[{"role":"user","content":"hi"}]}"#,
            400,
            "model",
        ),
        json_case("no messages", r#"{"model":"demo"}"#, 400, "messages"),
        json_case(
            "messages not a list",
            r#"{"model":"demo","messages":"hi"}"#,
            400,
            "messages",
        ),
        json_case(
            "no message at all",
            r#"{"model":"demo","messages":[]}"#,
            400,
            "messages",
        ),
        json_case(
            "an unknown role",
            r#"{"model":"demo","messages":[{"role":"wizard","content":"hi"}]}"#,
            400,
            "role",
        ),
        json_case(
            "content a number",
            r#"{"model":"demo","messages":[{"role":"user","content":42}]}"#,
            400,
            "content",
        ),
        json_case(
            "max_tokens negative",
            chat_with(r#","max_tokens":-5"#),
            400,
            "max_tokens",
        ),
        json_case(
            "max_tokens past the node's bound",
            chat_with(r#","max_tokens":99999999"#),
            400,
            "max_tokens",
        ),
        json_case(
            "temperature out of range",
            chat_with(r#","temperature":5"#),
            400,
            "temperature",
        ),
        json_case("n of zero", chat_with(r#","n":0"#), 400, "\"n\""),
        json_case(
            "five stop sequences",
            chat_with(r#","stop":["a","b","c","d","e"]"#),
            400,
            "stop",
        ),
        json_case(
            "tools not a list",
            chat_with(r#","tools":"all of them""#),
            400,
            "tools",
        ),
        json_case(
            "a tool without a function",
            chat_with(r#","tools":[{"type":"function"}]"#),
            400,
            "tools",
        ),
        json_case(
            "response_format of an unknown type",
            chat_with(r#","response_format":{"type":"telepathy"}"#),
            400,
            "response_format",
        ),
        json_case(
            "stream not a boolean",
            chat_with(r#","stream":"yes""#),
            400,
            "stream",
        ),
        json_case(
            "stream_options without stream",
            chat_with(r#","stream_options":{"include_usage":true}"#),
            400,
            "stream_options",
        ),
        json_case(
            "a misspelled parameter",
            chat_with(r#","temprature":0.5"#),
            400,
            "unknown_parameter",
        ),
        json_case(
            "an engine field the tenant is not granted",
            chat_with(r#","priority":-100"#),
            403,
            "field_not_allowed",
        ),
        json_case(
            "an unknown model",
            r#"{"model":"no-such-model","messages":[{"role":"user","content":"hi"}]}"#,
            404,
            "model",
        ),
        json_case("JSON nested 100,000 deep", deep, 400, "error"),
        json_case("5,000 messages", many_messages, 400, "messages"),
        json_case(
            "user not a string",
            chat_with(r#","user":{"id":1}"#),
            400,
            "user",
        ),
        json_case(
            "bytes that are not UTF-8",
            b"{\"model\":\"demo\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}",
            400,
            "error",
        ),
        json_case(
            "a body over max_body_bytes",
            chat_with(&format!(r#","user":"{}""#, "x".repeat(5 << 20))),
            413,
            "request_too_large",
        ),
        json_case(
            "a feature header with a line break",
            chat_with(""),
            400,
            "X-Meridian-Feature",
        )
        .with_header("x-meridian-feature", "a b\tc"),
        json_case(
            "an unknown cache directive",
            chat_with(""),
            400,
            "X-Meridian-Cache",
        )
        .with_header("x-meridian-cache", "forever"),
        json_case("an unknown URL", chat_with(""), 404, "unknown_url").at("/v1/teleport"),
        json_case(
            "Messages without max_tokens",
            r#"{"model":"demo","messages":[{"role":"user","content":"hi"}]}"#,
            400,
            "max_tokens",
        )
        .at("/v1/messages")
        .with_header("anthropic-version", "2023-06-01"),
        json_case(
            "Messages with a role Anthropic does not have",
            r#"{"model":"demo","max_tokens":5,"messages":[{"role":"system","content":"hi"}]}"#,
            400,
            "invalid_request_error",
        )
        .at("/v1/messages")
        .with_header("anthropic-version", "2023-06-01"),
        json_case(
            "Responses asking for stored state",
            r#"{"model":"demo","input":"hi","previous_response_id":"resp_1"}"#,
            400,
            "previous_response_id",
        )
        .at("/v1/responses"),
        json_case(
            "embeddings of an object",
            r#"{"model":"demo","input":{"text":"hi"}}"#,
            400,
            "input",
        )
        .at("/v1/embeddings"),
        json_case(
            "a text completion without a prompt",
            r#"{"model":"demo"}"#,
            400,
            "prompt",
        )
        .at("/v1/completions"),
    ]
}

/// The classes of hostile input tried, and what went wrong with them.
#[derive(Default)]
struct Tally {
    classes: Vec<&'static str>,
    failures: Vec<String>,
}

impl Tally {
    /// Counts the class `class`: a failure unless `answer` is an error with one of `codes`.
    fn refused<T: std::fmt::Debug>(
        &mut self,
        class: &'static str,
        codes: &[Code],
        answer: Result<T, tonic::Status>,
    ) {
        self.classes.push(class);
        match answer {
            Err(s) if codes.contains(&s.code()) => {}
            Err(s) => self
                .failures
                .push(format!("{class}: {:?} {}", s.code(), s.message())),
            Ok(accepted) => self
                .failures
                .push(format!("{class}: accepted: {accepted:?}")),
        }
    }
}

/// Sends raw bytes on a new connection; what came back before the node closed it (or the
/// answer's first bytes), `None` if the node neither answered nor closed within [`ANSWER`].
async fn raw(addr: &str, bytes: &[u8]) -> Option<String> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = conn.write_all(bytes).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + ANSWER;
    loop {
        match tokio::time::timeout_at(deadline.into(), conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buf[..n]);
                // An answer's head is enough: the node may keep the connection open after it.
                if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    Some(String::from_utf8_lossy(&answer).into_owned())
}

/// The status of a raw answer (0: the node closed without one).
fn status_of(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_a_clear_4xx_never_a_5xx_a_panic_or_a_hang() {
    let mut h = Harness::new(29);
    h.http_extra = "body_timeout = \"1s\"".into();
    let leader = h.boot(&[1]).await;
    h.put_tier_with(leader, limit::requests_per_minute(200))
        .await
        .expect("tier");
    h.put_tenant(leader, "hostile").await.expect("tenant");
    let key = h.api_key(leader, "hostile").await.expect("key");
    h.put_tenant(leader, "flooder").await.expect("tenant");
    let flooder = h.api_key(leader, "flooder").await.expect("key");
    let node = h.node(leader);
    let (base, addr) = (node.http(), node.http_addr());
    let client = reqwest::Client::builder().timeout(ANSWER).build().unwrap();
    let good = || {
        client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(chat_with(r#","max_tokens":4"#))
    };
    assert_eq!(good().send().await.unwrap().status(), 200);
    let rss_before = node.rss_kib().expect("rss");
    let mut tally = Tally::default();

    // Well-formed HTTP, hostile content.
    for case in http_cases() {
        let mut req = client
            .post(format!("{base}{}", case.path))
            .bearer_auth(&key)
            .body(case.body.clone());
        for (n, v) in &case.headers {
            req = req.header(*n, v);
        }
        tally.classes.push(case.name);
        match req.send().await {
            Err(e) => tally
                .failures
                .push(format!("{}: no answer: {e}", case.name)),
            Ok(r) => {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                let named = text.contains(case.names) && text.contains("\"message\"");
                if status != case.status || !named {
                    tally.failures.push(format!(
                        "{}: {status} (wanted {} naming {:?}): {}",
                        case.name,
                        case.status,
                        case.names,
                        &text[..text.len().min(300)]
                    ));
                }
            }
        }
    }

    // Credentials.
    for (name, auth) in [
        ("no credentials", None),
        ("a bearer with no token", Some("Bearer")),
        (
            "an unknown key",
            Some("Bearer sk-meridian-000000000000000000000000"),
        ),
        ("a key in another scheme", Some("Basic dXNlcjpwYXNz")),
    ] {
        tally.classes.push(name);
        let mut req = client
            .post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(chat_with(""));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        if status != 401 || !text.contains("authentication_error") {
            tally.failures.push(format!("{name}: {status} {text}"));
        }
    }

    // Broken or abusive HTTP: a 4xx, or the connection closed without an answer.
    let long_header = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let many_headers = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..500)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let smuggled = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
                    Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let bad_chunks = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    );
    let short_body = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: 500\r\n\r\n{{\"model\""
    );
    let bad_method = "GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    for (name, bytes, answered) in [
        (
            "garbage instead of a request line",
            b"\x16\x03\x01 hello?\r\n\r\n".to_vec(),
            false,
        ),
        (
            "an unknown HTTP version",
            b"GET /healthz HTTP/7.3\r\nHost: x\r\n\r\n".to_vec(),
            false,
        ),
        ("a 200 KB header", long_header.into_bytes(), false),
        ("500 headers", many_headers.into_bytes(), false),
        (
            "Content-Length with Transfer-Encoding",
            smuggled.as_bytes().to_vec(),
            false,
        ),
        ("a malformed chunk size", bad_chunks.into_bytes(), false),
        (
            "a body shorter than its Content-Length",
            short_body.into_bytes(),
            true,
        ),
        (
            "a method the URL does not take",
            bad_method.as_bytes().to_vec(),
            true,
        ),
    ] {
        tally.classes.push(name);
        match raw(&addr, &bytes).await {
            None => tally.failures.push(format!("{name}: hung")),
            Some(answer) => {
                let status = status_of(&answer);
                let ok = if answered {
                    (400..500).contains(&status)
                } else {
                    status == 0 || (400..500).contains(&status)
                };
                if !ok {
                    tally
                        .failures
                        .push(format!("{name}: {:?}", &answer[..answer.len().min(200)]));
                }
            }
        }
    }

    // A flood from one tenant: refused with 429 as its limit says, never a 5xx.
    tally
        .classes
        .push("a request flood past the tenant's limit");
    let mut statuses = std::collections::BTreeMap::new();
    let flood: Vec<_> = (0..300)
        .map(|_| {
            client
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&flooder)
                .header("content-type", "application/json")
                .body(chat_with(r#","max_tokens":4"#))
                .send()
        })
        .collect();
    for r in futures::future::join_all(flood).await {
        let status = r.map_or(0, |r| r.status().as_u16());
        *statuses.entry(status).or_insert(0) += 1;
    }
    if statuses.keys().any(|s| !matches!(s, 200 | 429)) || !statuses.contains_key(&429) {
        tally.failures.push(format!("flood: {statuses:?}"));
    }

    // gRPC.
    let channel = tonic::transport::Channel::from_shared(node.grpc())
        .unwrap()
        .connect()
        .await
        .expect("gRPC connects");
    let mut inference =
        InferenceClient::with_interceptor(channel.clone(), Bearer::new(Some(key.as_str())));
    let message = |content: &str| ChatMessage {
        role: Role::User as i32,
        content: content.into(),
        name: None,
        tool_call_id: None,
    };
    let chat = |model: &str, messages: Vec<ChatMessage>| ChatRequest {
        model: model.into(),
        messages,
        max_tokens: Some(4),
        ..ChatRequest::default()
    };
    let grpc_cases: Vec<(&'static str, ChatRequest, Code)> = vec![
        (
            "gRPC: no model",
            chat("", vec![message("hi")]),
            Code::InvalidArgument,
        ),
        (
            "gRPC: no messages",
            chat("demo", vec![]),
            Code::InvalidArgument,
        ),
        (
            "gRPC: an unknown model",
            chat("nope", vec![message("hi")]),
            Code::NotFound,
        ),
        (
            "gRPC: a role out of the enum",
            chat(
                "demo",
                vec![ChatMessage {
                    role: 99,
                    ..message("hi")
                }],
            ),
            Code::InvalidArgument,
        ),
        (
            "gRPC: temperature not a number",
            ChatRequest {
                temperature: Some(f32::NAN),
                ..chat("demo", vec![message("hi")])
            },
            Code::InvalidArgument,
        ),
        (
            "gRPC: five stop sequences",
            ChatRequest {
                stop: vec!["a".into(); 5],
                ..chat("demo", vec![message("hi")])
            },
            Code::InvalidArgument,
        ),
    ];
    for (name, req, code) in grpc_cases {
        tally.classes.push(name);
        match tokio::time::timeout(ANSWER, inference.chat(req)).await {
            Err(_) => tally.failures.push(format!("{name}: hung")),
            Ok(Ok(_)) => tally.failures.push(format!("{name}: accepted")),
            Ok(Err(s)) if s.code() != code || s.message().is_empty() => {
                tally
                    .failures
                    .push(format!("{name}: {:?} {}", s.code(), s.message()));
            }
            Ok(Err(_)) => {}
        }
    }
    let answer = inference
        .embed(EmbedRequest {
            model: "demo".into(),
            ..EmbedRequest::default()
        })
        .await;
    tally.refused(
        "gRPC: an embedding of nothing",
        &[Code::InvalidArgument],
        answer,
    );
    let answer = inference
        .chat(chat("demo", vec![message(&"x".repeat(8 << 20))]))
        .await;
    tally.refused(
        "gRPC: a message over the size bound",
        &[Code::ResourceExhausted, Code::OutOfRange],
        answer,
    );
    let mut anonymous = InferenceClient::new(channel.clone());
    let answer = anonymous.chat(chat("demo", vec![message("hi")])).await;
    tally.refused("gRPC: no credentials", &[Code::Unauthenticated], answer);
    let mut req = tonic::Request::new(chat("demo", vec![message("hi")]));
    req.metadata_mut()
        .insert("grpc-timeout", "forever".parse().unwrap());
    let answer = inference.chat(req).await;
    tally.refused(
        "gRPC: a malformed grpc-timeout",
        &[Code::InvalidArgument],
        answer,
    );
    tally.classes.push("gRPC: HTTP/1 garbage on its port");
    let grpc_addr = node.grpc().trim_start_matches("http://").to_owned();
    match raw(&grpc_addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await {
        None => tally
            .failures
            .push("gRPC port: hung on HTTP/1 garbage".into()),
        Some(answer) if status_of(&answer) >= 500 => {
            tally.failures.push(format!("gRPC port: {answer:?}"));
        }
        Some(_) => {}
    }

    // Admin.
    let admin_channel = tonic::transport::Channel::from_shared(node.admin())
        .unwrap()
        .connect()
        .await
        .expect("admin connects");
    for (class, token) in [
        ("admin: no token", None),
        (
            "admin: a wrong token",
            Some("not-the-admin-token-not-the-admin-token"),
        ),
    ] {
        let mut stranger = AdminClient::with_interceptor(admin_channel.clone(), Bearer::new(token));
        let answer = stranger.node_status(pb::NodeStatusRequest {}).await;
        tally.refused(class, &[Code::Unauthenticated], answer);
    }
    let mut admin = h.admin(leader).await.expect("admin");
    let answer = admin
        .put_tenant(pb::PutTenantRequest {
            tenant: Some(meridian_tests::tenant("a/b", "free")),
        })
        .await;
    tally.refused(
        "admin: a tenant id with a slash",
        &[Code::InvalidArgument],
        answer,
    );
    let answer = admin
        .put_tier(pb::PutTierRequest {
            tier: Some(pb::Tier::default()),
        })
        .await;
    tally.refused(
        "admin: a tier with no name",
        &[Code::InvalidArgument],
        answer,
    );
    let answer = admin
        .create_api_key(pb::CreateApiKeyRequest {
            tenant: "nobody".into(),
            label: String::new(),
        })
        .await;
    tally.refused(
        "admin: a key for a tenant that does not exist",
        &[Code::NotFound, Code::FailedPrecondition],
        answer,
    );
    let answer = admin
        .revoke_certificate(pb::RevokeCertificateRequest {
            fingerprint_sha256: "not-a-sha256".into(),
            node_id: 2,
        })
        .await;
    tally.refused(
        "admin: a revocation of something that is not a fingerprint",
        &[Code::InvalidArgument],
        answer,
    );
    let answer = admin
        .cluster_state(pb::ClusterStateRequest {
            section: "secrets".into(),
            ..pb::ClusterStateRequest::default()
        })
        .await;
    tally.refused(
        "admin: an unknown state section",
        &[Code::InvalidArgument],
        answer,
    );

    // A slow body (the node's body timeout is 1 s here), then the node still serves.
    tally.classes.push("a body that never arrives");
    let slow = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    let sent = Instant::now();
    match raw(&addr, slow.as_bytes()).await {
        // Answered by the 1 s body timeout: not before it, and within 3 × it.
        Some(answer)
            if status_of(&answer) == 408
                && (Duration::from_millis(900)..Duration::from_secs(3))
                    .contains(&sent.elapsed()) => {}
        other => tally.failures.push(format!(
            "a body that never arrives: {other:?} after {:?}",
            sent.elapsed()
        )),
    }
    let after = good().send().await.unwrap();
    assert_eq!(after.status(), 200, "the node still serves");
    let rss_after = node.rss_kib().expect("rss");
    println!(
        "{} classes of hostile input; node RSS {} KiB before, {} KiB after (+{} KiB)",
        tally.classes.len(),
        rss_before,
        rss_after,
        rss_after.saturating_sub(rss_before)
    );
    assert!(
        tally.failures.is_empty(),
        "{} of {} classes failed:\n{}",
        tally.failures.len(),
        tally.classes.len(),
        tally.failures.join("\n")
    );
    assert!(tally.classes.len() >= 40, "{} classes", tally.classes.len());
    assert!(
        rss_after < rss_before + 128 * 1024,
        "RSS grew by {} KiB",
        rss_after - rss_before
    );
}
