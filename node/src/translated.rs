//! The APIs the HTTP edge serves by translation to chat: Anthropic's Messages
//! (`POST /v1/messages`, `/v1/messages/count_tokens`: the official `anthropic` SDKs, Claude
//! Code) and OpenAI's Responses (`POST /v1/responses`). The request is read as a chat request
//! (`meridian_proto::anthropic`, `meridian_proto::responses`) and runs the one pipeline like any
//! other; its answer — whole, streamed or from the cache — is written back in the API's own
//! shape (a `message` or Anthropic's named events; a `response` or its semantic events), and
//! errors in the API's own shape. Credentials come as `x-api-key` (Anthropic's) or
//! `Authorization: Bearer`. `anthropic-version` and `anthropic-beta` are accepted and not
//! needed: the translation speaks one version ([`meridian_proto::anthropic::API_VERSION`]).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue};
use meridian_actors::{Answer, Incoming};
use meridian_proto::ApiError;
use meridian_proto::anthropic::{self, MessageStream};
use meridian_proto::openai::{Api, ChatRequest};
use meridian_proto::responses::{self, Echo, ResponseStream};
use serde_json::json;

use crate::headers::Edge;
use crate::http::{
    Framing, HttpState, cached_sse, decorate, json_response, read_body, sse_response,
};
use crate::respond::{anthropic_error, http_error};

/// A translated API, with what its answers need of the request.
enum Translated {
    /// Answers name the model as the client asked for it.
    Messages {
        model: String,
    },
    Responses {
        echo: Box<Echo>,
    },
}

impl Translated {
    fn read(api: Api, body: &[u8], st: &HttpState) -> (Self, Result<ChatRequest, ApiError>) {
        let limits = &st.gateway.limits();
        match api {
            Api::Responses => match responses::responses_request(body, limits) {
                Ok((request, echo)) => (
                    Self::Responses {
                        echo: Box::new(echo),
                    },
                    Ok(request),
                ),
                Err(e) => (
                    Self::Responses {
                        echo: Box::default(),
                    },
                    Err(e),
                ),
            },
            _ => {
                let request = anthropic::messages_request(body, limits, false);
                let model = request
                    .as_ref()
                    .map(|r| r.model().to_owned())
                    .unwrap_or_default();
                (Self::Messages { model }, request)
            }
        }
    }

    fn whole(&self, completion: &[u8]) -> Result<Vec<u8>, ApiError> {
        match self {
            Self::Messages { model } => anthropic::message_from_completion(completion, model),
            Self::Responses { echo } => responses::response_from_completion(completion, echo),
        }
    }

    fn framing(&self, request_id: &str) -> Framing {
        match self {
            Self::Messages { model } => Framing::Anthropic {
                events: Box::new(MessageStream::new(model)),
                request_id: request_id.to_owned(),
            },
            Self::Responses { echo } => Framing::Responses {
                events: Box::new(ResponseStream::new(Echo::clone(echo))),
            },
        }
    }

    fn error(&self, e: &ApiError, request_id: &str) -> Response {
        match self {
            Self::Messages { .. } => anthropic_error(e, request_id),
            Self::Responses { .. } => http_error(e),
        }
    }
}

pub async fn messages(st: State<Arc<HttpState>>, headers: HeaderMap, body: Body) -> Response {
    serve(Api::Messages, st, headers, body).await
}

pub async fn responses(st: State<Arc<HttpState>>, headers: HeaderMap, body: Body) -> Response {
    serve(Api::Responses, st, headers, body).await
}

/// One call of a translated API; the body is read once the caller is let in, and what its
/// translation needs to answer is kept aside as it is read.
async fn serve(
    api: Api,
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let kept = std::sync::Mutex::new(None);
    let request = Incoming::Later(Box::pin(async {
        let body = read_body(body, &headers, &st.body).await?;
        let (translated, mut request) = Translated::read(api, &body, &st);
        *kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(translated);
        // What an Anthropic provider is sent with the client's own request.
        if let Ok(Some(native)) = request.as_mut().map(|r| r.native.as_mut()) {
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            native.version = header("anthropic-version");
            native.beta = header("anthropic-beta");
        }
        request
    }));
    let served = crate::http::call(&st, api, &headers, request).await;
    // A body never read (the caller was not let in, or it did not arrive): the API's shape.
    let translated = kept
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or_else(|| Translated::read(api, b"", &st).0);
    let id = served.request_id.as_str().to_owned();
    let whole = |completion: &[u8], limits: usize| match translated.whole(completion) {
        Ok(answer) => json_response(Bytes::from(answer), limits),
        Err(e) => translated.error(&e, &id),
    };
    let mut resp = match served.answer {
        // An Anthropic provider's own answer to the client's own request: as it came.
        Ok(Answer::Complete(body)) if served.native => {
            json_response(body, served.rate_limits.len())
        }
        Ok(Answer::Stream(stream)) if served.native => sse_response(
            stream,
            Framing::AnthropicNative {
                request_id: id.clone(),
            },
            st.sse_heartbeat,
        ),
        Ok(Answer::Complete(body)) => whole(&body, served.rate_limits.len()),
        Ok(Answer::Stream(stream)) => {
            sse_response(stream, translated.framing(&id), st.sse_heartbeat)
        }
        Ok(Answer::Cached(hit)) if hit.stream => cached_sse(&hit, translated.framing(&id)),
        Ok(Answer::Cached(hit)) => whole(&hit.completion, 0),
        Err(e) => translated.error(&e, &id),
    };
    if api == Api::Messages
        && let Ok(v) = HeaderValue::from_str(&id)
    {
        // Anthropic's own name for the request id, beside ours.
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
    body: Body,
) -> Response {
    let (request_id, credentials, ..) = crate::headers::call_parts(
        Edge::Http,
        headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
    );
    let request = read_body(body, &headers, &st.body)
        .await
        .and_then(|body| anthropic::messages_request(&body, &st.gateway.limits(), true));
    match st.gateway.count_tokens(credentials, request) {
        Ok(n) => axum::Json(json!({ "input_tokens": n })).into_response(),
        Err(e) => anthropic_error(&e, request_id.as_str()),
    }
}
