//! The gRPC edge: `meridian.v1.Inference` (same request path as HTTP), plus the standard
//! `grpc.health.v1` service and server reflection.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use meridian_actors::auth::Principal;
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

impl InferenceService {
    fn prepare(
        &self,
        req: Request<pb::ChatRequest>,
        stream: bool,
    ) -> Result<(ChatRequest, RequestContext, Option<String>), Status> {
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
        let ctx = RequestContext {
            request_id,
            principal,
            deadline,
            reservation: None,
            complexity,
            weight: 1,
        };
        Ok((chat, ctx, feature))
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

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ChatChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn chat(
        &self,
        req: Request<pb::ChatRequest>,
    ) -> Result<Response<pb::ChatResponse>, Status> {
        let (chat, mut ctx, feature) = self.prepare(req, false)?;
        ctx.reservation = self
            .gateway
            .admit(ctx.principal.as_ref(), &chat, feature.as_deref())
            .await
            .map_err(|e| grpc_status(&e))?;
        match self.gateway.chat(chat, ctx).await {
            Ok(ChatReply::Complete(c)) => {
                let completion: ChatCompletion = serde_json::from_slice(&c.body).map_err(|e| {
                    grpc_status(&ApiError::new(
                        ErrorKind::Upstream,
                        format!("the provider's completion could not be read: {e}"),
                    ))
                })?;
                Ok(Response::new(completion.into()))
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
        let (chat, mut ctx, feature) = self.prepare(req, true)?;
        ctx.reservation = self
            .gateway
            .admit(ctx.principal.as_ref(), &chat, feature.as_deref())
            .await
            .map_err(|e| grpc_status(&e))?;
        let relay = match self.gateway.chat(chat, ctx).await {
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
                match serde_json::from_slice::<ChatCompletionChunk>(json) {
                    Ok(chunk) => items.push(Ok(pb::ChatChunk::from(chunk))),
                    Err(e) => {
                        items.push(Err(grpc_status(&ApiError::new(
                            ErrorKind::Upstream,
                            format!("a chunk from the provider could not be read: {e}"),
                        ))));
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
        Ok(Response::new(Box::pin(stream)))
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
