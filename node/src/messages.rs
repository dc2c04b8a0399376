//! Anthropic's Messages API on the HTTP edge: `POST /v1/messages` (stream and not) and
//! `POST /v1/messages/count_tokens`, for the official `anthropic` SDKs and Claude Code. The
//! request is read as a chat request (`meridian_proto::anthropic`) and runs the one pipeline
//! like any other; its answer — whole, streamed or from the cache — is written back as a
//! `message` or as Anthropic's named events, and every error in Anthropic's shape. Credentials
//! come as `x-api-key` (Anthropic's) or `Authorization: Bearer`. `anthropic-version` and
//! `anthropic-beta` are accepted and not needed: the translation speaks one version
//! ([`meridian_proto::anthropic::API_VERSION`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue};
use meridian_actors::{Answer, Call};
use meridian_proto::anthropic::{self, MessageStream};
use meridian_proto::openai::Api;
use serde_json::json;

use crate::headers::Edge;
use crate::http::{
    Framing, HttpState, body_error, cached_sse, decorate, json_response, sse_response,
};
use crate::respond::anthropic_error;

pub async fn messages(
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (request_id, credentials, options, trace) = crate::headers::call_parts(
        Edge::Http,
        headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
    );
    let request = body
        .map_err(body_error)
        .and_then(|body| anthropic::messages_request(&body, st.gateway.limits(), false));
    // Answers name the model as the client asked for it.
    let model = request
        .as_ref()
        .map(|r| r.model().to_owned())
        .unwrap_or_default();
    let served = st
        .gateway
        .serve(Call {
            edge: Edge::Http,
            api: Api::Messages,
            trace,
            request_id,
            credentials,
            options,
            request,
        })
        .await;
    let id = served.request_id.as_str().to_owned();
    let framing = || Framing::Anthropic {
        events: Box::new(MessageStream::new(&model)),
        request_id: id.clone(),
    };
    let whole = |completion: &[u8], limits: usize| match anthropic::message_from_completion(
        completion, &model,
    ) {
        Ok(message) => json_response(Bytes::from(message), limits),
        Err(e) => anthropic_error(&e, &id),
    };
    let mut resp = match served.answer {
        Ok(Answer::Complete(body)) => whole(&body, served.rate_limits.len()),
        Ok(Answer::Stream(stream)) => sse_response(stream, framing(), st.sse_heartbeat),
        Ok(Answer::Cached(hit)) if hit.stream => cached_sse(&hit, framing()),
        Ok(Answer::Cached(hit)) => whole(&hit.completion, 0),
        Err(e) => anthropic_error(&e, &id),
    };
    // Anthropic's own name for the request id, beside ours.
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("request-id", v);
    }
    decorate(
        resp,
        served.cache,
        served.cost_micro_usd,
        served.rate_limits,
        &served.request_id,
    )
}

pub async fn count_tokens(
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (request_id, credentials, ..) = crate::headers::call_parts(
        Edge::Http,
        headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
    );
    let request = body
        .map_err(body_error)
        .and_then(|body| anthropic::messages_request(&body, st.gateway.limits(), true));
    match st.gateway.count_tokens(credentials, request) {
        Ok(n) => axum::Json(json!({ "input_tokens": n })).into_response(),
        Err(e) => anthropic_error(&e, request_id.as_str()),
    }
}
