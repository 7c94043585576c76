//! modelgate's proxy: an OpenAI-compatible gateway that authenticates virtual keys, routes by
//! model with weights, tiers and retries, streams, enforces limits and budgets, and meters
//! tokens and cost.
//!
//! ```text
//!  config (file │ operator) ─► config::compile ─► snapshot::Live (arc-swap)
//!                                                        │ load once per request
//!  client ─► server ─► proxy: auth → route → (cache) → admission → forward (providers) → meter
//!                                                        ├► shadow (a sampled copy, detached)
//!                                                        ├► stream (SSE pass-through)
//!                                                        └► synth (whole answers as streams)
//! ```
#![forbid(unsafe_code)]

pub mod accesslog;
pub mod admission;
pub mod busy;
pub mod cache;
pub mod canonical;
pub mod cli;
pub mod config;
pub mod control;
pub mod egress;
pub mod error;
pub mod keys;
pub mod mask;
pub mod meter;
pub mod metrics;
pub mod providers;
pub mod proxy;
pub mod request;
pub mod routes;
pub mod server;
pub mod shadow;
pub mod snapshot;
pub mod source;
pub mod stream;
pub mod synth;
#[cfg(test)]
mod timing;
pub mod traces;
pub mod translate;
