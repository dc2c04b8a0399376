//! The Meridian node: configuration, the HTTP/SSE edge, the gRPC and admin services, and their
//! composition with the actors ([`App`]). `main.rs` is a thin shell over this library, so tests
//! run the very same [`App`] in-process.

pub mod admin;
pub mod alerts;
pub mod app;
pub mod calls;
pub mod config;
pub mod conns;
pub mod discover;
pub mod grpc;
pub mod handover;
pub mod headers;
pub mod http;
pub mod listener;
pub mod logs;
pub mod metrics;
pub mod otlp;
pub mod peering;
pub mod ratelimit;
pub mod reload;
pub mod respond;
pub mod skew;
pub mod traces;
pub mod translated;

pub use app::{App, AppError};
pub use config::{Config, ConfigError};
