//! Meridian's wire contract.
//!
//! Everything that crosses a process boundary is defined here and nowhere else:
//! - [`pb`]: the protobuf services (public inference API, admin API), generated at build time by
//!   protox + tonic-prost-build, plus encoded descriptor sets for gRPC reflection;
//! - [`openai`]: the OpenAI-compatible JSON shapes of the HTTP edge and of OpenAI-style upstreams
//!   (vLLM, OpenAI), with request validation that names the offending field;
//! - [`error`]: the shared [`ErrorKind`] and the client-visible [`ApiError`] value;
//! - [`ids`]: newtype ids;
//! - [`cluster`]: the replicated commands and the state they build.
//!
//! This crate has no runtime: construction, validation and conversion only.

pub mod anthropic;
#[cfg(test)]
mod chat_stream_fixtures;
pub mod cluster;
pub mod convert;
pub mod error;
pub mod ids;
pub mod openai;
pub mod responses;

pub use error::{ApiError, ErrorKind};
pub use ids::RequestId;

/// Generated protobuf code.
pub mod pb {
    /// The public inference API (`meridian.v1`).
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("meridian.v1");
    }
    /// The operator API (`meridian.admin.v1`).
    pub mod admin {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("meridian.admin.v1");
    }
    /// Encoded `FileDescriptorSet` of the public inference API, for gRPC server reflection.
    pub const INFERENCE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/inference_descriptor.bin"));
    /// Encoded `FileDescriptorSet` of the admin API, for reflection on the admin port.
    pub const ADMIN_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/admin_descriptor.bin"));
}
