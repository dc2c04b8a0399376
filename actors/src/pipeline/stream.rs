//! A streamed answer as the edge pulls it: relayed piece by piece, cut when the node's drain
//! runs out of time, gathered for the cache, and recorded once at its end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use meridian_proto::openai::Usage;
use meridian_proto::{ApiError, ErrorKind};
use tokio::time::Instant;

use super::{Ending, Summary, finish_reasons, record};
use crate::cache::{CacheKey, StreamCollector};
use crate::calllog::Recorder;
use crate::connection::{RelayStream, StreamEnd, StreamPiece};
use crate::gateway::Gateway;

/// A provider's stream as the edge pulls it: the [`RelayStream`], recorded once at its end (or
/// when the client drops it first).
pub struct ServedStream {
    pub(super) relay: RelayStream,
    pub(super) recorder: Arc<Recorder>,
    pub(super) summary: Summary,
    /// When its first content was handed to the edge.
    pub(super) first_chunk: Option<Instant>,
    pub(super) recorded: bool,
    /// For a stream that may be cached: its key, and the whole answer gathered as it passes
    /// (stored when the stream ends complete; a failed or abandoned one is not).
    pub(super) cache: Option<(CacheKey, Gateway, StreamCollector)>,
    /// Whether the node's drain has run out of time.
    pub(super) cut: CutSignal,
}

/// The drain's cut, as one stream watches it: looked at (a version compare, no lock) before each
/// piece, and waited for (which registers with the channel, under its lock) only while the
/// stream has nothing to give.
pub(super) struct CutSignal {
    pub(super) rx: tokio::sync::watch::Receiver<bool>,
    pub(super) wait: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

impl CutSignal {
    fn is_cut(&self) -> bool {
        self.rx.has_changed().unwrap_or(false) && *self.rx.borrow()
    }

    fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let rx = &self.rx;
        self.wait
            .get_or_insert_with(|| {
                let mut rx = rx.clone();
                Box::pin(async move {
                    let _ = rx.wait_for(|c| *c).await;
                })
            })
            .as_mut()
            .poll(cx)
    }
}

impl std::fmt::Debug for ServedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedStream")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl ServedStream {
    fn record(&mut self, ending: Ending<'_>) {
        if !self.recorded {
            self.recorded = true;
            // A stream cut short before its usage report is billed as its limits were charged:
            // the prompt as estimated (the provider read it) and the chunks relayed.
            let generated = self.relay.generated();
            let prompt = self.summary.prompt_estimate;
            let usage = self.relay.usage().or_else(|| {
                (generated > 0 || prompt > 0).then(|| Usage {
                    prompt_tokens: u32::try_from(prompt).unwrap_or(u32::MAX),
                    completion_tokens: generated,
                    ..Usage::default()
                })
            });
            record(
                &self.recorder,
                &mut self.summary,
                ending,
                usage,
                self.first_chunk,
            );
        }
    }
}

impl Stream for ServedStream {
    type Item = StreamPiece;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<StreamPiece>> {
        let this = &mut *self;
        // Recorded: it has given its last piece.
        if this.recorded {
            return Poll::Ready(None);
        }
        let piece = if this.cut.is_cut() {
            None
        } else {
            match this.relay.poll_next_unpin(cx) {
                Poll::Ready(piece) => Some(piece),
                Poll::Pending if this.cut.poll_wait(cx).is_ready() => None,
                Poll::Pending => return Poll::Pending,
            }
        };
        let Some(piece) = piece else {
            let e = ApiError::new(
                ErrorKind::Unavailable,
                "this node is shutting down and its drain timeout has passed; the stream was cut",
            )
            .with_code("node_draining")
            .with_retry_after(std::time::Duration::from_secs(1));
            this.record(Ending::Failed(&e));
            return Poll::Ready(Some(StreamPiece {
                chunks: Vec::new(),
                end: Some(StreamEnd::Failed(e)),
            }));
        };
        if this.first_chunk.is_none() && piece.as_ref().is_some_and(|p| !p.chunks.is_empty()) {
            this.first_chunk = Some(Instant::now());
        }
        if this.summary.recorded()
            && let Some(p) = &piece
        {
            for chunk in &p.chunks {
                finish_reasons(chunk, &mut this.summary.finish_reasons);
            }
        }
        if let (Some((_, _, collector)), Some(p)) = (&mut this.cache, &piece) {
            for chunk in &p.chunks {
                collector.push(chunk);
            }
        }
        match piece.as_ref().map(|p| &p.end) {
            Some(None) => {}
            Some(Some(StreamEnd::Done)) => {
                // The relay kept the usage chunk from a client that did not ask for it; the
                // stored answer has the usage all the same.
                if let Some((key, gateway, mut collector)) = this.cache.take() {
                    if let Some(u) = this.relay.usage() {
                        collector.set_usage(&u);
                    }
                    if let Some(completion) = collector.completion() {
                        gateway.cache_put(key, completion);
                    }
                }
                this.record(Ending::Streamed)
            }
            Some(Some(StreamEnd::Failed(e))) => this.record(Ending::Failed(e)),
            None => this.record(Ending::Failed(&ApiError::new(
                ErrorKind::Internal,
                "the stream ended unexpectedly",
            ))),
        }
        Poll::Ready(piece)
    }
}

impl Drop for ServedStream {
    fn drop(&mut self) {
        self.record(Ending::Abandoned);
    }
}
