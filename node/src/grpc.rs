//! The gRPC edge: `meridian.v1.Inference` (same request path as HTTP, response cache
//! included: `x-meridian-cache` metadata both ways), plus the standard `grpc.health.v1` service
//! and server reflection.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use meridian_actors::auth::Principal;
use meridian_actors::cache::CacheKey;
use meridian_actors::{ChatReply, Gateway, RequestContext, StreamEnd};
use meridian_proto::openai::{
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatRequest, StreamOptions,
};
use meridian_proto::pb::v1 as pb;
use meridian_proto::pb::v1::inference_server::Inference;
use meridian_proto::{ApiError, ErrorKind, RequestId};
use tonic::{Request, Response, Status};

use crate::respond::grpc_status;

pub struct InferenceService {
    pub gateway: Gateway,
    pub started_unix: i64,
}

/// A call, checked and ready to route.
struct Prepared {
    chat: ChatRequest,
    ctx: RequestContext,
    feature: Option<String>,
    /// Its response-cache key, when it may be cached.
    cache: Option<CacheKey>,
}

impl InferenceService {
    fn prepare(&self, req: Request<pb::ChatRequest>, stream: bool) -> Result<Prepared, Status> {
        let request_id = RequestId::from_client(
            req.metadata()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
        );
        let principal = self.authenticate(req.metadata())?;
        let deadline = grpc_deadline(req.metadata())?;
        let feature = crate::http::feature_of(
            req.metadata()
                .get("x-meridian-feature")
                .map(|v| v.as_bytes()),
        )
        .map_err(|e| grpc_status(&e))?
        .map(str::to_owned);
        let complexity = crate::http::complexity_of(
            req.metadata()
                .get("x-meridian-complexity")
                .map(|v| v.as_bytes()),
        )
        .map_err(|e| grpc_status(&e))?;
        let opt_in =
            crate::http::cache_opt_in(req.metadata().get("x-meridian-cache").map(|v| v.as_bytes()));
        let mut params =
            ChatCompletionRequest::try_from(req.into_inner()).map_err(|e| grpc_status(&e))?;
        params.stream = Some(stream);
        if stream {
            params.stream_options = Some(StreamOptions {
                include_usage: Some(true),
            });
        }
        let chat =
            ChatRequest::from_params(params, self.gateway.limits()).map_err(|e| grpc_status(&e))?;
        let cache = self.gateway.cache_key(principal.as_ref(), &chat, opt_in);
        let ctx = RequestContext {
            request_id,
            principal,
            deadline,
            reservation: None,
            complexity,
            weight: 1,
        };
        Ok(Prepared {
            chat,
            ctx,
            feature,
            cache,
        })
    }

    /// The cached answer to `p`, if there is one (a hit is free: no admission, no provider).
    fn cached(&self, p: &Prepared) -> Option<bytes::Bytes> {
        self.gateway
            .cache_get(p.cache?, p.ctx.principal.as_ref(), p.chat.model())
    }

    /// The caller, from the `authorization` (`Bearer …`) or `x-api-key` metadata.
    fn authenticate(&self, md: &tonic::metadata::MetadataMap) -> Result<Option<Principal>, Status> {
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok());
        self.gateway
            .authenticate(get("authorization"), get("x-api-key"))
            .map_err(|e| grpc_status(&e))
    }
}

/// The client's deadline from `grpc-timeout` (e.g. `250m`: 250 ms; units H M S m u n).
fn grpc_deadline(
    md: &tonic::metadata::MetadataMap,
) -> Result<Option<tokio::time::Instant>, Status> {
    let Some(v) = md.get("grpc-timeout").and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let bad = || {
        grpc_status(&ApiError::invalid(
            "grpc-timeout",
            format!(
                "grpc-timeout {v:?} is not a number of 1 to 8 digits followed by H, M, S, m, u or n"
            ),
        ))
    };
    if v.len() < 2 || v.len() > 9 {
        return Err(bad());
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let d = match unit {
        "H" => std::time::Duration::from_secs(n * 3600),
        "M" => std::time::Duration::from_secs(n * 60),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return Err(bad()),
    };
    Ok(Some(tokio::time::Instant::now() + d))
}

fn internal(message: &str) -> Status {
    grpc_status(&ApiError::new(ErrorKind::Internal, message))
}

/// Marks a cacheable call's response as answered from the cache or not.
fn cache_metadata<T>(resp: &mut Response<T>, hit: bool) {
    resp.metadata_mut().insert(
        "x-meridian-cache",
        tonic::metadata::MetadataValue::from_static(crate::http::cache_outcome(hit)),
    );
}

fn completion_of(body: &[u8]) -> Result<pb::ChatResponse, Status> {
    let completion: ChatCompletion = serde_json::from_slice(body).map_err(|e| {
        grpc_status(&ApiError::new(
            ErrorKind::Upstream,
            format!("the provider's completion could not be read: {e}"),
        ))
    })?;
    Ok(completion.into())
}

fn chunk_of(json: &[u8]) -> Result<pb::ChatChunk, Status> {
    serde_json::from_slice::<ChatCompletionChunk>(json)
        .map(pb::ChatChunk::from)
        .map_err(|e| {
            grpc_status(&ApiError::new(
                ErrorKind::Upstream,
                format!("a chunk from the provider could not be read: {e}"),
            ))
        })
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ChatChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn chat(
        &self,
        req: Request<pb::ChatRequest>,
    ) -> Result<Response<pb::ChatResponse>, Status> {
        let mut p = self.prepare(req, false)?;
        if let Some(hit) = self.cached(&p) {
            let mut resp = Response::new(completion_of(&hit)?);
            cache_metadata(&mut resp, true);
            return Ok(resp);
        }
        p.ctx.reservation = self
            .gateway
            .admit(p.ctx.principal.as_ref(), &p.chat, p.feature.as_deref())
            .await
            .map_err(|e| grpc_status(&e))?;
        match self.gateway.chat(p.chat, p.ctx).await {
            Ok(ChatReply::Complete(c)) => {
                let mut resp = Response::new(completion_of(&c.body)?);
                if let Some(key) = p.cache {
                    self.gateway.cache_put(key, c.body);
                    cache_metadata(&mut resp, false);
                }
                Ok(resp)
            }
            Ok(ChatReply::Stream(_)) => Err(internal("a unary call was answered with a stream")),
            Err(e) => Err(grpc_status(&e)),
        }
    }

    type ChatStreamStream = ChunkStream;

    async fn chat_stream(
        &self,
        req: Request<pb::ChatRequest>,
    ) -> Result<Response<Self::ChatStreamStream>, Status> {
        let mut p = self.prepare(req, true)?;
        if let Some(hit) = self.cached(&p) {
            // A whole answer replayed as the chunks a stream of it would have had.
            let chunks = meridian_actors::cache::as_chunks(&hit, true)
                .ok_or_else(|| internal("a cached answer could not be replayed"))?;
            let items: Vec<Result<pb::ChatChunk, Status>> =
                chunks.iter().map(|c| chunk_of(c.as_bytes())).collect();
            let mut resp: Response<ChunkStream> =
                Response::new(Box::pin(futures::stream::iter(items)));
            cache_metadata(&mut resp, true);
            return Ok(resp);
        }
        p.ctx.reservation = self
            .gateway
            .admit(p.ctx.principal.as_ref(), &p.chat, p.feature.as_deref())
            .await
            .map_err(|e| grpc_status(&e))?;
        let relay = match self.gateway.chat(p.chat, p.ctx).await {
            Ok(ChatReply::Stream(relay)) => relay,
            Ok(ChatReply::Complete(_)) => {
                return Err(internal("a streaming call was answered whole"));
            }
            Err(e) => return Err(grpc_status(&e)),
        };
        // Each piece becomes that many messages; the stream ends after Done, or with an error
        // status after a failure (or if the relay ended without a verdict).
        let stream = futures::stream::unfold(Some(relay), |relay| async move {
            let mut relay = relay?;
            let Some(piece) = relay.next().await else {
                return Some((vec![Err(internal("the stream ended unexpectedly"))], None));
            };
            let mut items = Vec::with_capacity(piece.chunks.len() + 1);
            for json in &piece.chunks {
                match chunk_of(json) {
                    Ok(chunk) => items.push(Ok(chunk)),
                    Err(e) => {
                        items.push(Err(e));
                        return Some((items, None));
                    }
                }
            }
            match piece.end {
                None => Some((items, Some(relay))),
                Some(StreamEnd::Done) => Some((items, None)),
                Some(StreamEnd::Failed(e)) => {
                    items.push(Err(grpc_status(&e)));
                    Some((items, None))
                }
            }
        })
        .flat_map(futures::stream::iter);
        let mut resp: Response<ChunkStream> = Response::new(Box::pin(stream));
        if p.cache.is_some() {
            // Streams are not stored (only whole answers are); a later whole call fills it.
            cache_metadata(&mut resp, false);
        }
        Ok(resp)
    }

    async fn list_models(
        &self,
        req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.authenticate(req.metadata())?;
        let models = self
            .gateway
            .models()
            .iter()
            .map(|id| pb::Model {
                id: id.clone(),
                created: self.started_unix,
                owned_by: "meridian".into(),
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}
