//! Proof for modelgate: a mock OpenAI-compatible upstream, a harness that runs the real
//! proxy binary against it on 127.0.0.1, and small HTTP and metrics helpers.
#![forbid(unsafe_code)]

pub mod harness;
pub mod k8s;
pub mod upstream;
