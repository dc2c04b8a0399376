//! The gRPC edge: `meridian.v1.Inference` (same request path as HTTP), plus the standard
//! `grpc.health.v1` service and server reflection.

use std::pin::Pin;

use futures::Stream;
use meridian_actors::{ChatReply, ClientEvent, Gateway, RequestContext};
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
    ) -> Result<(ChatRequest, RequestContext), Status> {
        let request_id = RequestId::from_client(
            req.metadata()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
        );
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
            deadline: None,
        };
        Ok((chat, ctx))
    }
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
        let (chat, ctx) = self.prepare(req, false)?;
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
        let (chat, ctx) = self.prepare(req, true)?;
        let rx = match self.gateway.chat(chat, ctx).await {
            Ok(ChatReply::Stream(rx)) => rx,
            Ok(ChatReply::Complete(_)) => {
                return Err(internal("a streaming call was answered whole"));
            }
            Err(e) => return Err(grpc_status(&e)),
        };
        let stream = futures::stream::unfold(Some(rx), |rx| async move {
            let mut rx = rx?;
            let item = match rx.recv().await {
                Some(ClientEvent::Chunk(json)) => {
                    match serde_json::from_slice::<ChatCompletionChunk>(&json) {
                        Ok(chunk) => Ok(pb::ChatChunk::from(chunk)),
                        Err(e) => {
                            return Some((
                                Err(grpc_status(&ApiError::new(
                                    ErrorKind::Upstream,
                                    format!("a chunk from the provider could not be read: {e}"),
                                ))),
                                None,
                            ));
                        }
                    }
                }
                Some(ClientEvent::Done) => return None,
                Some(ClientEvent::Error(e)) => return Some((Err(grpc_status(&e)), None)),
                None => return Some((Err(internal("the stream ended unexpectedly")), None)),
            };
            Some((item, Some(rx)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_models(
        &self,
        _req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
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
