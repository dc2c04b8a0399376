//! The gRPC edge: `meridian.v1.Inference` — `Chat`, `ChatStream`, `Embed`, `ListModels` (same
//! request path as HTTP, response cache
//! included: `x-meridian-cache` metadata both ways), plus the standard `grpc.health.v1` service
//! and server reflection.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use meridian_actors::{Answer, CacheOutcome, Call, Gateway, Incoming, ServedStream, StreamEnd};
use meridian_proto::openai::{
    Api, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatRequest, StreamOptions,
    Usage,
};
use meridian_proto::pb::v1 as pb;
use meridian_proto::pb::v1::inference_server::Inference;
use meridian_proto::{ApiError, ErrorKind};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::headers::{self, Edge};
use crate::respond::grpc_status;

pub struct InferenceService {
    pub gateway: Gateway,
    pub started_unix: i64,
}

impl InferenceService {
    /// The pipeline's call for a chat request (`stream`: `ChatStream`, whose streams always end
    /// with a usage chunk).
    fn chat_call<'a>(
        &self,
        md: &'a MetadataMap,
        mut message: pb::ChatRequest,
        stream: bool,
    ) -> Call<'a> {
        let feature = message.feature.take();
        call(md, Api::Chat, feature, || {
            ChatCompletionRequest::try_from(message).and_then(|mut params| {
                params.stream = Some(stream);
                if stream {
                    params.stream_options = Some(StreamOptions {
                        include_usage: Some(true),
                    });
                }
                ChatRequest::from_params(params, &self.gateway.limits())
            })
        })
    }
}

/// The pipeline's call for a gRPC request: what the metadata says of the caller and the call,
/// then the request `read` from its message (after the metadata, so that the call's deadline
/// counts the reading).
fn call(
    md: &MetadataMap,
    api: Api,
    feature: Option<String>,
    read: impl FnOnce() -> Result<ChatRequest, ApiError>,
) -> Call<'_> {
    let (request_id, credentials, options, trace) = headers::call_parts(Edge::Grpc, ascii(md));
    let request = read();
    Call {
        edge: Edge::Grpc,
        api,
        trace,
        request_id,
        credentials,
        options: headers::with_feature(options, feature),
        request: Incoming::Read(request),
    }
}

/// The text (not `-bin`) metadata of a call, as the header parser reads it.
fn ascii(md: &MetadataMap) -> impl Iterator<Item = (&str, &[u8])> {
    md.iter().filter_map(|entry| match entry {
        tonic::metadata::KeyAndValueRef::Ascii(k, v) => Some((k.as_str(), v.as_bytes())),
        tonic::metadata::KeyAndValueRef::Binary(..) => None,
    })
}

fn internal(message: &str) -> Status {
    grpc_status(&ApiError::new(ErrorKind::Internal, message))
}

/// Marks a cacheable call's response as answered from the cache or not.
fn cache_metadata<T>(resp: &mut Response<T>, cache: Option<CacheOutcome>) {
    if let Some(cache) = cache {
        resp.metadata_mut().insert(
            "x-meridian-cache",
            tonic::metadata::MetadataValue::from_static(cache.as_str()),
        );
    }
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

/// A provider's embeddings answer (floats) as the gRPC response.
fn embeddings_of(body: &[u8]) -> Result<pb::EmbedResponse, Status> {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        model: String,
        data: Vec<Item>,
        #[serde(default)]
        usage: Option<Usage>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(default)]
        index: u32,
        embedding: Vec<f32>,
    }
    let a: Answer = serde_json::from_slice(body).map_err(|e| {
        grpc_status(&ApiError::new(
            ErrorKind::Upstream,
            format!("the provider's embeddings could not be read: {e}"),
        ))
    })?;
    Ok(pb::EmbedResponse {
        model: a.model,
        data: a
            .data
            .into_iter()
            .map(|i| pb::Embedding {
                index: i.index,
                embedding: i.embedding,
            })
            .collect(),
        usage: a.usage.map(|u| pb::Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            cached_tokens: u.cached_tokens(),
        }),
    })
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ChatChunk, Status>> + Send>>;

/// A provider's stream as gRPC messages: each piece becomes that many messages; the stream
/// ends after `Done`, or with an error status after a failure (or if the relay ended without
/// a verdict).
fn relayed(relay: ServedStream) -> impl Stream<Item = Result<pb::ChatChunk, Status>> + Send {
    futures::stream::unfold(Some(relay), |relay| async move {
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
    .flat_map(futures::stream::iter)
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn chat(
        &self,
        req: Request<pb::ChatRequest>,
    ) -> Result<Response<pb::ChatResponse>, Status> {
        let (md, _, message) = req.into_parts();
        let served = self
            .gateway
            .serve(self.chat_call(&md, message, false))
            .await;
        let mut resp = match served.answer {
            Ok(Answer::Complete(body)) => Response::new(completion_of(&body)?),
            Ok(Answer::Cached(hit)) => Response::new(completion_of(&hit.completion)?),
            Ok(Answer::Stream(_)) => {
                return Err(internal("a unary call was answered with a stream"));
            }
            Err(e) => return Err(grpc_status(&e)),
        };
        cache_metadata(&mut resp, served.cache);
        if let Some(v) = served
            .cost_micro_usd
            .and_then(|c| crate::headers::usd(c).parse().ok())
        {
            resp.metadata_mut().insert("x-meridian-cost-usd", v);
        }
        Ok(resp)
    }

    type ChatStreamStream = ChunkStream;

    async fn chat_stream(
        &self,
        req: Request<pb::ChatRequest>,
    ) -> Result<Response<Self::ChatStreamStream>, Status> {
        let (md, _, message) = req.into_parts();
        let served = self.gateway.serve(self.chat_call(&md, message, true)).await;
        let stream: ChunkStream = match served.answer {
            Ok(Answer::Stream(relay)) => Box::pin(relayed(relay)),
            Ok(Answer::Cached(hit)) => {
                // A whole answer replayed as the chunks a stream of it would have had.
                let chunks = hit.chunks().map_err(|e| grpc_status(&e))?;
                let items: Vec<Result<pb::ChatChunk, Status>> =
                    chunks.iter().map(|c| chunk_of(c.as_bytes())).collect();
                Box::pin(futures::stream::iter(items))
            }
            Ok(Answer::Complete(_)) => return Err(internal("a streaming call was answered whole")),
            Err(e) => return Err(grpc_status(&e)),
        };
        let mut resp = Response::new(stream);
        cache_metadata(&mut resp, served.cache);
        Ok(resp)
    }

    async fn embed(
        &self,
        req: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let (md, _, mut message) = req.into_parts();
        let feature = message.feature.take();
        let read = || {
            // The provider is asked for floats, which the response carries as they are.
            let mut body = serde_json::json!({
                "model": message.model, "input": message.input, "encoding_format": "float",
            });
            if let Some(d) = message.dimensions {
                body["dimensions"] = d.into();
            }
            if let Some(u) = message.user {
                body["user"] = u.into();
            }
            serde_json::to_vec(&body)
                .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))
                .and_then(|b| {
                    ChatRequest::from_json_as(Api::Embeddings, &b, &self.gateway.limits())
                })
        };
        let served = self
            .gateway
            .serve(call(&md, Api::Embeddings, feature, read))
            .await;
        let body = match served.answer {
            Ok(Answer::Complete(body)) => body,
            Ok(Answer::Cached(hit)) => hit.completion,
            Ok(Answer::Stream(_)) => {
                return Err(internal("an embeddings call was answered with a stream"));
            }
            Err(e) => return Err(grpc_status(&e)),
        };
        let mut resp = Response::new(embeddings_of(&body)?);
        cache_metadata(&mut resp, served.cache);
        Ok(resp)
    }

    async fn list_models(
        &self,
        req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let (_, credentials, ..) = headers::call_parts(Edge::Grpc, ascii(req.metadata()));
        let models = self
            .gateway
            .list_models(credentials)
            .map_err(|e| grpc_status(&e))?
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
