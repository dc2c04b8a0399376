//! The OpenAI chat-completions dialect (OpenAI, vLLM and compatible servers): their stream
//! events are already chunks, passed on as received.

use bytes::Bytes;
use meridian_proto::openai::{ChunkProbe, UpstreamErrorInfo};

use super::{Chunk, UpstreamError};

/// Probes one event's JSON; keeps its bytes unless they span lines (then they are compacted,
/// because a newline inside a relayed `data:` field would break the client's framing).
pub fn to_chunk(data: Bytes) -> Result<Chunk, UpstreamError> {
    let probe: ChunkProbe = serde_json::from_slice(&data)
        .map_err(|e| UpstreamError::Protocol(format!("a stream event is not a JSON chunk: {e}")))?;
    if probe.error.is_some() {
        let info = UpstreamErrorInfo::parse(&data).unwrap_or_default();
        return Err(UpstreamError::InStream(info));
    }
    let (usage_only, generated, usage) = (probe.is_usage_only(), probe.generates(), probe.usage);
    let json = if memchr::memchr2(b'\n', b'\r', &data).is_some() {
        let v: serde_json::Value =
            serde_json::from_slice(&data).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        Bytes::from(serde_json::to_vec(&v).map_err(|e| UpstreamError::Protocol(e.to_string()))?)
    } else {
        data
    };
    Ok(Chunk {
        usage_only,
        generated,
        usage,
        json,
    })
}
