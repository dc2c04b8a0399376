//! The mock's legacy text completions (`POST /v1/completions`) and embeddings
//! (`POST /v1/embeddings`), in the OpenAI and vLLM wire formats: `text_completion` objects and
//! chunks (vLLM adds `stop_reason` to each choice and leaves `usage` off until the usage chunk;
//! OpenAI puts `"usage":null` on every chunk when usage is asked for), and embedding lists with
//! floats or base64 of little-endian `f32`s.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use base64::Engine;
use serde_json::{Value, json};

use super::{
    End, Flavor, Script, Shared, StreamGuard, error_response, json_response, sse_response,
    unauthorized,
};

/// The output cap both servers apply to a text completion that sets no `max_tokens`.
const DEFAULT_MAX_TOKENS: usize = 16;

/// Dimensions of the mock's embeddings unless `dimensions` asks for fewer.
const DIMENSIONS: usize = 8;

/// The prompts or inputs of a request as (text, tokens) pairs: a string counts its words, a
/// token array its length. `None` when the field has none of OpenAI's four shapes.
fn inputs(v: &Value) -> Option<Vec<(String, usize)>> {
    let one = |v: &Value| match v {
        Value::String(s) => Some((s.clone(), s.split_whitespace().count().max(1))),
        Value::Array(ids) if ids.iter().all(Value::is_u64) && !ids.is_empty() => {
            Some((String::new(), ids.len()))
        }
        _ => None,
    };
    match v {
        Value::String(_) => Some(vec![one(v)?]),
        Value::Array(items) if items.iter().all(Value::is_u64) => Some(vec![one(v)?]),
        Value::Array(items) => items.iter().map(one).collect(),
        _ => None,
    }
}

/// Reads the request as both servers would, or answers their error.
async fn read(s: &Shared, headers: &HeaderMap, body: &Bytes) -> Result<Value, Response> {
    s.stats.requests.fetch_add(1, SeqCst);
    s.maybe_hang().await;
    let flavor = s.opts.flavor;
    if let Some(refused) = unauthorized(flavor, s.opts.api_key.as_deref(), headers) {
        return Err(refused);
    }
    let req: Value = serde_json::from_slice(body)
        .map_err(|e| error_response(flavor, 400, &format!("invalid JSON: {e}")))?;
    *s.stats
        .last_request
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(req.clone());
    let model = req["model"].as_str().unwrap_or_default();
    if s.opts.strict_models && !s.serves(model) {
        return Err(error_response(
            flavor,
            404,
            &format!("The model `{model}` does not exist."),
        ));
    }
    Ok(req)
}

/// [`read`], then the request's inputs under `field` (see [`inputs`]) and its model.
async fn read_inputs(
    s: &Shared,
    headers: &HeaderMap,
    body: &Bytes,
    field: &str,
) -> Result<(Value, Vec<(String, usize)>, String), Response> {
    let req = read(s, headers, body).await?;
    let Some(items) = inputs(&req[field]) else {
        return Err(error_response(
            s.opts.flavor,
            400,
            &format!("{field} must be a string, a list of strings or token ids"),
        ));
    };
    let model = req["model"].as_str().unwrap_or_default().to_owned();
    Ok((req, items, model))
}

pub(super) async fn completions(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived = s.stats.minute_now();
    let (req, prompts, model) = match read_inputs(&s, &headers, &body, "prompt").await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    let flavor = s.opts.flavor;
    let script = match Script::of(&headers, &model, &s.opts.default_script) {
        Ok(s) => s,
        Err(e) => return error_response(flavor, 400, &e),
    };
    if let Some(status) = script.fail {
        s.stats.failed.fetch_add(1, SeqCst);
        return error_response(flavor, status, &format!("scripted failure {status}"));
    }
    let cap = req["max_tokens"]
        .as_u64()
        .map_or(DEFAULT_MAX_TOKENS, |m| m as usize);
    let tokens = script.tokens.min(cap);
    let finish = if script.tokens > cap {
        "length"
    } else {
        "stop"
    };
    let prompt_tokens: usize = prompts.iter().map(|(_, n)| n).sum();
    let echo = req["echo"].as_bool().unwrap_or(false);
    let logprobs = req["logprobs"].as_u64();
    let id = format!("cmpl-mock{}", s.stats.requests.load(SeqCst));
    let created = 1_763_700_000;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": tokens * prompts.len(),
                       "total_tokens": prompt_tokens + tokens * prompts.len()});
    let log_probs = |texts: &[String]| {
        logprobs.map(|k| {
            json!({
                "tokens": texts,
                "token_logprobs": texts.iter().map(|_| -0.5).collect::<Vec<_>>(),
                "top_logprobs": texts.iter().map(|t| {
                    let mut top = serde_json::Map::new();
                    top.insert(t.clone(), json!(-0.5));
                    for i in 1..k {
                        top.insert(format!("alt{i}"), json!(-1.5));
                    }
                    Value::Object(top)
                }).collect::<Vec<_>>(),
                "text_offset": (0..texts.len()).collect::<Vec<_>>(),
            })
        })
    };
    let texts: Vec<String> = (0..tokens).map(|i| script.token(i)).collect();
    if req["stream"].as_bool() != Some(true) {
        script.wait_first_token(&s.stats).await;
        s.stats.served(
            arrived,
            prompt_tokens as u64,
            (tokens * prompts.len()) as u64,
        );
        s.stats.served_user(
            req["user"].as_str(),
            (prompt_tokens + tokens * prompts.len()) as u64,
        );
        s.stats.completed.fetch_add(1, SeqCst);
        let choices: Vec<Value> = prompts
            .iter()
            .enumerate()
            .map(|(index, (prompt, _))| {
                let text = if echo { format!("{prompt}{}", texts.concat()) } else { texts.concat() };
                let mut c = json!({"text": text, "index": index, "logprobs": log_probs(&texts), "finish_reason": finish});
                if flavor == Flavor::Vllm {
                    c["stop_reason"] = Value::Null;
                    c["prompt_logprobs"] = Value::Null;
                }
                c
            })
            .collect();
        return json_response(&json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage,
            "system_fingerprint": if flavor == Flavor::OpenAi { json!("fp_mock") } else { Value::Null },
        }));
    }
    let include_usage = req["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    if include_usage {
        s.stats.usage_requested.fetch_add(1, SeqCst);
    }
    let chunk = move |text: &str, finish: Option<&str>| {
        let choice = json!({"text": text, "index": 0, "logprobs": null, "finish_reason": finish});
        let mut c = json!({"id": id, "object": "text_completion", "created": created, "model": model,
                           "choices": [choice]});
        match flavor {
            Flavor::Vllm => c["choices"][0]["stop_reason"] = Value::Null,
            _ if include_usage => c["usage"] = Value::Null,
            _ => {}
        }
        c
    };
    let usage_chunk = {
        let mut c = chunk("", None);
        c["choices"] = json!([]);
        c["usage"] = usage;
        c
    };
    let mut frames: Vec<Value> = Vec::new();
    if echo {
        frames.push(chunk(&prompts[0].0, None));
    }
    frames.extend(texts.iter().map(|t| chunk(t, None)));
    frames.push(chunk("", Some(finish)));
    if include_usage {
        frames.push(usage_chunk);
    }
    let guard = StreamGuard::start(&s.stats);
    let stats = Arc::clone(&s.stats);
    let total = frames.len();
    let steps = futures::stream::unfold(
        (frames.into_iter().enumerate(), guard, script),
        move |(mut frames, mut guard, script)| {
            let stats = Arc::clone(&stats);
            async move {
                let (i, frame) = match frames.next() {
                    Some(next) => next,
                    None if guard.end == End::Open => {
                        stats.served(arrived, prompt_tokens as u64, tokens as u64);
                        guard.end = End::Completed;
                        return Some((
                            vec![Ok(Bytes::from_static(b"data: [DONE]\n\n"))],
                            (frames, guard, script),
                        ));
                    }
                    None => return None,
                };
                if i == 0 {
                    script.wait_first_token(&stats).await;
                } else if i < total && !script.itl.is_zero() {
                    tokio::time::sleep(script.itl).await;
                }
                let bytes = Bytes::from(format!("data: {frame}\n\n"));
                Some((vec![Ok(bytes)], (frames, guard, script)))
            }
        },
    );
    sse_response(steps)
}

pub(super) async fn embeddings(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived = s.stats.minute_now();
    let (req, items, model) = match read_inputs(&s, &headers, &body, "input").await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    let flavor = s.opts.flavor;
    let base64 = match req["encoding_format"].as_str() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return error_response(flavor, 400, &format!("unknown encoding_format {other:?}"));
        }
    };
    let dimensions = req["dimensions"]
        .as_u64()
        .map_or(DIMENSIONS, |d| (d as usize).min(DIMENSIONS));
    let prompt_tokens: usize = items.iter().map(|(_, n)| n).sum();
    let data: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(index, (text, n))| {
            // A fixed vector per input, from its length (the mock knows no meaning).
            let seed = (text.len() + n) as f32;
            let v: Vec<f32> = (0..dimensions)
                .map(|i| ((seed + i as f32) * 0.37).sin())
                .collect();
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    s.stats.served(arrived, prompt_tokens as u64, 0);
    s.stats
        .served_user(req["user"].as_str(), prompt_tokens as u64);
    s.stats.completed.fetch_add(1, SeqCst);
    let mut body = json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    });
    if flavor == Flavor::Vllm {
        body["id"] = json!(format!("embd-mock{}", s.stats.requests.load(SeqCst)));
        body["created"] = json!(1_763_700_000);
        body["usage"]["completion_tokens"] = json!(0);
    }
    json_response(&body)
}
